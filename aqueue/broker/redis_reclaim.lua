-- Claim entries whose consumer has gone quiet for longer than the visibility timeout, and
-- dead-letter those already delivered max_deliveries times instead of handing them out again.
-- The calling consumer's own entries are skipped: it renews the ones it holds and recovers the rest.
--
-- KEYS[1] stream, KEYS[2] dead-letter stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle (ms), ARGV[4] count, ARGV[5] max deliveries,
-- ARGV[6] idle time (ms) after which a consumer holding nothing is removed from the group
-- Returns the claimed entries, as XCLAIM does.
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, min_idle = ARGV[1], ARGV[2], ARGV[3]
local max_deliveries = tonumber(ARGV[5])

local claim = {}
local pending = redis.call('XPENDING', stream, group, 'IDLE', min_idle, '-', '+', ARGV[4])
for _, p in ipairs(pending) do
  local id, owner, deliveries = p[1], p[2], p[4]
  if owner ~= consumer then
    if deliveries >= max_deliveries then
      local entry = redis.call('XRANGE', stream, id, id)[1]
      if entry then
        redis.call('XADD', dead, '*', unpack(entry[2]))
      end
      redis.call('XACK', stream, group, id)
      redis.call('XDEL', stream, id)
    else
      claim[#claim + 1] = id
    end
  end
end

-- Consumers of crashed workers would otherwise stay listed in the group for ever. Removing one
-- that holds nothing is harmless: a live consumer is recreated by its next read.
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for i = 1, #c, 2 do
    info[c[i]] = c[i + 1]
  end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[6]) and info['name'] ~= consumer then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
  end
end

if #claim == 0 then
  return {}
end
return redis.call('XCLAIM', stream, group, consumer, min_idle, unpack(claim))
