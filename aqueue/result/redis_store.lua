-- Store task states: one call carries every state stored in one event loop turn.
--
-- KEYS the result keys (each is also the channel its waiters listen on)
-- ARGV[1] time to live in milliseconds, 0 to keep the keys
-- ARGV[2] one character per key: '1' to PUBLISH the state (it is ready), '0' not to
-- ARGV[2 + i] the encoded state of KEYS[i]
-- Returns the number of states stored.
local ttl, publish = tonumber(ARGV[1]), ARGV[2]
for i, key in ipairs(KEYS) do
  local data = ARGV[i + 2]
  if ttl > 0 then
    redis.call('SET', key, data, 'PX', ttl)
  else
    redis.call('SET', key, data)
  end
  if string.byte(publish, i) == 49 then
    redis.call('PUBLISH', key, data)
  end
end
return #KEYS
