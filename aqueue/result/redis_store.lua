-- Store task states, as Celery stores them: one call carries every state stored in one event loop turn.
--
-- KEYS the result keys (each is also the channel its waiters listen on)
-- ARGV[1] time to live in milliseconds, 0 to keep the keys
-- ARGV[2] how stored states are encoded: 'json', 'msgpack', or '' (unreadable here: pickle)
-- ARGV[2 + i] the encoded state of KEYS[i]
-- Each state is SET and PUBLISHed on its key, unless the key holds a SUCCESS already: a redelivered
-- task run a second time never replaces a success (Celery reads the key first for the same reason).
-- Returns the number of states stored.
local ttl, format = tonumber(ARGV[1]), ARGV[2]

local function succeeded(old)
  if not old then
    return false
  end
  local ok, state
  if format == 'json' then
    ok, state = pcall(cjson.decode, old)
  elseif format == 'msgpack' then
    ok, state = pcall(cmsgpack.unpack, old)
  else
    return false
  end
  return ok and type(state) == 'table' and state['status'] == 'SUCCESS'
end

local stored = 0
for i, key in ipairs(KEYS) do
  local data = ARGV[i + 2]
  if not succeeded(redis.call('GET', key)) then
    if ttl > 0 then
      redis.call('SET', key, data, 'PX', ttl)
    else
      redis.call('SET', key, data)
    end
    redis.call('PUBLISH', key, data)
    stored = stored + 1
  end
end
return stored
