-- One header task's final state reported to its chord's join.
--
-- KEYS[1] hash of the parts (field: the task's index in the header), KEYS[2] hash of the chord's flags
-- ARGV[1] index, ARGV[2] the encoded state, ARGV[3] chord size, ARGV[4] time to live (ms),
-- ARGV[5] the index again, as the report's token: a copy of the report that completed the join (sent
-- again after a lost reply, or redelivered after its worker died) is still first, and no other is
-- Returns {0} while parts are missing; once complete {1, first, sent, part 0, part 1, ...}, where
-- first is 1 for the report that completed the join (and its copies), sent 1 once it was sent.
local parts, flags = KEYS[1], KEYS[2]
redis.call('HSETNX', parts, ARGV[1], ARGV[2])
redis.call('PEXPIRE', parts, ARGV[4])
local size = tonumber(ARGV[3])
if redis.call('HLEN', parts) < size then
  return {0}
end
redis.call('HSETNX', flags, 'fired', ARGV[5])
local first = redis.call('HGET', flags, 'fired') == ARGV[5] and 1 or 0
redis.call('PEXPIRE', flags, ARGV[4])
local sent = redis.call('HEXISTS', flags, 'sent')
local reply = {1, first, sent}
for i = 0, size - 1 do
  reply[#reply + 1] = redis.call('HGET', parts, tostring(i)) or false
end
return reply
