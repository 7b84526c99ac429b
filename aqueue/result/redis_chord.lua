-- One header task's final state reported to its chord's join.
--
-- KEYS[1] hash of the parts (field: the task's index in the header), KEYS[2] hash of the chord's flags
-- ARGV[1] index, ARGV[2] the encoded state, ARGV[3] chord size, ARGV[4] time to live (ms),
-- ARGV[5] a token unique to this report (so a report sent again after a lost reply is still first)
-- Returns {0} while parts are missing; once complete {1, first, sent, by, part 0, part 1, ...}, where
-- first is 1 for the one report that claimed the callback, sent 1 once it was sent, and by the index
-- of the part whose report claimed it.
local parts, flags = KEYS[1], KEYS[2]
redis.call('HSETNX', parts, ARGV[1], ARGV[2])
redis.call('PEXPIRE', parts, ARGV[4])
local size = tonumber(ARGV[3])
if redis.call('HLEN', parts) < size then
  return {0}
end
if redis.call('HSETNX', flags, 'fired', ARGV[5]) == 1 then
  redis.call('HSET', flags, 'by', ARGV[1])
end
local first = redis.call('HGET', flags, 'fired') == ARGV[5] and 1 or 0
redis.call('PEXPIRE', flags, ARGV[4])
local sent = redis.call('HEXISTS', flags, 'sent')
local reply = {1, first, sent, tonumber(redis.call('HGET', flags, 'by'))}
for i = 0, size - 1 do
  reply[#reply + 1] = redis.call('HGET', parts, tostring(i)) or false
end
return reply
