-- Bind a queue to a direct exchange as kombu's binding refresh does, so kombu's senders find it.
-- KEYS[1]: the exchange's binding table; KEYS[2]: the deadlines of binding tables.
-- ARGV[1]: the binding (routing key, pattern and queue joined by \x06\x16); ARGV[2]: the exchange;
-- ARGV[3]: milliseconds the table is kept without a refresh.
redis.call('SADD', KEYS[1], ARGV[1])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[2], 'GT', ms + tonumber(ARGV[3]), ARGV[2])
