-- Raise a mark shared by every process on this Redis (beat: the last due time sent for an entry).
-- KEYS[1]: the mark; ARGV[1]: the value. Sets the mark when it is unset or below the value, and returns
-- the mark as it was (nil when unset). The mark never expires: it is one small string per entry.
local previous = redis.call('GET', KEYS[1])
if (not previous) or tonumber(previous) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return previous
