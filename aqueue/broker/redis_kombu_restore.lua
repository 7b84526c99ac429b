-- Give a held message back to a list, if it is still held as it was read (nobody settled it since).
-- KEYS[1]: kombu's unacked hash; KEYS[2]: unacked_index; KEYS[3]: aqueue's claims; KEYS[4]: the list.
-- ARGV[1]: the delivery tag; ARGV[2]: its unacked value as read; ARGV[3]: the payload to push;
-- ARGV[4]: 'RPUSH' (next to be taken) or 'LPUSH' (last).
-- Returns 1 when it was given back, 0 when it had been settled or restored by someone else.
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
    return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call(ARGV[4], KEYS[4], ARGV[3])
return 1
