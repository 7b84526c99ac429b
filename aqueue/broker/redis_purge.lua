-- Delete the waiting entries of a queue: those its group has not delivered yet, and the delayed
-- ones. Entries being worked on (pending in the group) are left to their consumers.
--
-- KEYS[1] stream, KEYS[2] sorted set of delayed entries
-- ARGV[1] group
-- Returns the number of entries deleted.
local count = redis.call('ZCARD', KEYS[2])
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return count
end
local start = '-'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  if info['name'] == ARGV[1] then
    start = '(' .. info['last-delivered-id']
  end
end
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 500)
  if #batch == 0 then
    break
  end
  local ids = {}
  for i, entry in ipairs(batch) do
    ids[i] = entry[1]
  end
  redis.call('XDEL', KEYS[1], unpack(ids))
  count = count + #ids
  start = '(' .. ids[#ids]
end
return count
