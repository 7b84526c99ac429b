-- Move entries out of a stream: add a copy to a target stream (the same stream to requeue, the
-- dead-letter stream to reject), then acknowledge and delete the original, all in one step.
--
-- KEYS[1] stream, KEYS[2] target stream
-- ARGV[1] group, ARGV[2] '1' to mark the copy redelivered, '' to copy as is, ARGV[3..] entry ids
-- Returns the number of entries copied.
local stream, target, group, mark = KEYS[1], KEYS[2], ARGV[1], ARGV[2] == '1'
local copied = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('XRANGE', stream, id, id)[1]
  if entry then
    local fields = entry[2]
    if mark then
      local marked = false
      for j = 1, #fields, 2 do
        if fields[j] == 'redelivered' then
          marked = true
        end
      end
      if not marked then
        fields[#fields + 1] = 'redelivered'
        fields[#fields + 1] = '1'
      end
    end
    redis.call('XADD', target, '*', unpack(fields))
    copied = copied + 1
  end
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
return copied
