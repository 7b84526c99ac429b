-- Move delayed entries whose time has come from the sorted set to the stream.
-- A member holds the entry's fields and values as length-prefixed strings: "4:body5:hello...".
--
-- KEYS[1] sorted set (score = unix time due), KEYS[2] stream
-- ARGV[1] now (unix time), ARGV[2] at most this many entries
-- Returns {moved, score of the next delayed entry or nil}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local fields, pos = {}, 1
  while pos <= #member do
    local colon = string.find(member, ':', pos, true)
    local size = tonumber(string.sub(member, pos, colon - 1))
    fields[#fields + 1] = string.sub(member, colon + 1, colon + size)
    pos = colon + size + 1
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('ZREM', KEYS[1], member)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
return {#due, next_due or false}
