-- A token bucket shared by every worker on this Redis (global_rate_limit).
-- KEYS[1]: the bucket; ARGV[1]: tokens per second; ARGV[2]: capacity.
-- Takes a token when there is one and returns "0"; else returns the seconds until there is one.
-- Redis's own clock is used, so workers on machines whose clocks disagree still share one rate.
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(bucket[1]) or capacity
local stamp = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(1000 * capacity / rate) + 60000)
return tostring(wait)
