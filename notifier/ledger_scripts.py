"""The ledger's Lua scripts: each decision that two processes could race on is one script."""

ACCEPT = """
-- One round trip for the whole acceptance: dedup/idempotency check, the transaction, its
-- dispatch task on the Celery queue, its outbox entry, the first history line and the events
-- counter. Stored and queued happen together or not at all.
-- KEYS: tx, dedup (or ''), idem (or ''), outbox, events metric hash, dispatch queue
-- ARGV: txid, now, retention_s, dedup_ttl_ms, idem_ttl_s, body_hash, source,
--       metric field new, duplicate, replay, outbox sweep-after time, dispatch message,
--       then the transaction's fields: f1, v1, ...
local function note(txid, what)
  local log = 'ntf:tx:' .. txid .. ':log'
  redis.call('RPUSH', log, cjson.encode({at = tonumber(ARGV[2]), event = what, source = ARGV[7]}))
  redis.call('EXPIRE', log, ARGV[3])
end
local function suppressed(outcome, txid, field)
  redis.call('HINCRBY', 'ntf:tx:' .. txid, 'suppressed_count', 1)
  note(txid, outcome .. '_suppressed')
  redis.call('HINCRBYFLOAT', KEYS[5], field, 1)
  return {outcome, txid}
end
if KEYS[2] ~= '' then
  local orig = redis.call('GET', KEYS[2])
  if orig then return suppressed('duplicate', orig, ARGV[9]) end
end
if KEYS[3] ~= '' then
  local prior = redis.call('GET', KEYS[3])
  if prior then
    local sep = string.find(prior, '|', 1, true)
    local txid, hash = string.sub(prior, 1, sep - 1), string.sub(prior, sep + 1)
    if hash == ARGV[6] then return suppressed('replay', txid, ARGV[10]) end
    return {'conflict', txid}
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('EXPIRE', KEYS[1], ARGV[3])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4]) end
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[6], 'EX', ARGV[5]) end
redis.call('ZADD', KEYS[4], ARGV[11], ARGV[1])
redis.call('LPUSH', KEYS[6], ARGV[12])
note(ARGV[1], 'accepted')
redis.call('HINCRBYFLOAT', KEYS[5], ARGV[8], 1)
return {'new', ARGV[1]}
"""

ADD_DELIVERIES = """
-- KEYS: open index, then per delivery: its hash, its transaction's delivery list
-- ARGV: retention_s, now, then per delivery: id, JSON object of its fields
local created = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local key, list = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local id, fields = ARGV[3 + 2 * i], cjson.decode(ARGV[4 + 2 * i])
  if redis.call('HEXISTS', key, 'transaction_id') == 0 then
    for name, value in pairs(fields) do redis.call('HSET', key, name, value) end
    redis.call('EXPIRE', key, ARGV[1])
    redis.call('RPUSH', list, id)
    redis.call('EXPIRE', list, ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(created, id)
  end
end
return created
"""

CLAIM = """
-- KEYS: delivery; ARGV: token, now, lease_s
local st = redis.call('HMGET', KEYS[1], 'status', 'claim_token', 'claim_at')
local status = st[1]
if not status then return 'missing' end
local result = 'claimed'
if status == 'sending' then
  local stale = (tonumber(ARGV[2]) - tonumber(st[3] or '0')) > tonumber(ARGV[3])
  if st[2] ~= ARGV[1] and not stale then return 'busy' end
  result = 'reclaimed'
elseif status ~= 'queued' and status ~= 'retrying' and status ~= 'deferred' then
  return 'done'
end
redis.call('HSET', KEYS[1], 'status', 'sending', 'claim_token', ARGV[1], 'claim_at', ARGV[2],
           'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
return result
"""
