-- Take up to ARGV[1] messages from kombu's lists and hold them unacknowledged, in one atomic step.
-- KEYS[1..m]: the lists, in consume order; KEYS[m+1..2m]: the dead-letter list of each one's queue;
-- KEYS[2m+1]: kombu's unacked hash; KEYS[2m+2]: kombu's unacked_index; KEYS[2m+3]: aqueue's claims.
-- ARGV[1]: how many at most; ARGV[2]: now (unix time, the index's score); ARGV[3]: m;
-- ARGV[3+i]: what follows the payload in the unacked value of list i (',"","<queue>"]').
-- A message is held as kombu's QoS holds it (unacked[tag] = [payload, exchange, routing key], and the
-- tag scored by now in unacked_index), and claimed by now in aqueue's claims. One without a string
-- properties.delivery_tag cannot be held: it goes to its dead-letter list as it is.
-- Returns {list number, payload, tag or ''} for each message taken.
local n, now, m = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local unacked, index, claims = KEYS[2 * m + 1], KEYS[2 * m + 2], KEYS[2 * m + 3]
local out, taken = {}, 0
for i = 1, m do
    while taken < n do
        local item = redis.call('RPOP', KEYS[i])
        if not item then break end
        taken = taken + 1
        local ok, payload = pcall(cjson.decode, item)
        local tag = ok and type(payload) == 'table' and type(payload.properties) == 'table'
            and payload.properties.delivery_tag
        if type(tag) == 'string' and tag ~= '' then
            redis.call('HSET', unacked, tag, '[' .. item .. ARGV[3 + i])
            redis.call('ZADD', index, now, tag)
            redis.call('ZADD', claims, now, tag)
        else
            redis.call('LPUSH', KEYS[m + i], item)
            tag = ''
        end
        out[#out + 1] = i
        out[#out + 1] = item
        out[#out + 1] = tag
    end
end
return out
