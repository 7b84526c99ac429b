-- Remove a consumer from its group on each stream where it holds nothing.
-- Deleting a consumer drops its pending entries, so one that still holds some is kept.
--
-- KEYS streams (one without the group is skipped)
-- ARGV[1] group, ARGV[2] consumer
for _, stream in ipairs(KEYS) do
  local held = redis.pcall('XPENDING', stream, ARGV[1], '-', '+', 1, ARGV[2])
  if type(held) == 'table' and not held['err'] and #held == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], ARGV[2])
  end
end
return #KEYS
