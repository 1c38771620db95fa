"""The ledger's Lua scripts: each decision that two processes could race on is one script."""

from notifier.ledger_counts import COUNTED, RECOUNT
from notifier.ledger_keys import DEADLETTERS

_ACCEPT_EVENTS = """
-- One round trip for the acceptance of one or more events: for each, the dedup/idempotency
-- check, the transaction, its outbox entry and the events counter; then a Celery dispatch
-- message for each group of events that stored one. Stored and queued happen together or not
-- at all. (Its "accepted" history line is the transaction's created_at and source, read back
-- by Ledger.history: a list entry written here cost a quarter of the script's time per event.)
-- KEYS: outbox, events metric hash, dispatch queue, then per event: tx, dedup (or ''), idem (or '')
-- ARGV: now, retention_s, dedup_ttl_ms, idem_ttl_s, outbox sweep-after time, events per
--       dispatch message, the accepted status, then 9 per event: txid, body_hash, source, metric
--       field new, duplicate, replay, the field keeping the event and its value, receiver;
--       then the dispatch messages, the first naming the first events-per-message events, and
--       so on. (Few values per event: each is packed, parsed and copied into Lua once more per
--       webhook.)
-- Returns: outcome, txid for each event in order.
local now, retention = ARGV[1], ARGV[2]
local counted = {}  -- metric field -> events: one HINCRBYFLOAT per field, not per event
local outboxed = {}  -- score, txid, ...: one ZADD for the call's new transactions
local function count(field)
  counted[field] = (counted[field] or 0) + 1
end
local function suppressed(outcome, txid, field, source)
  redis.call('HINCRBY', 'ntf:tx:' .. txid, 'suppressed_count', 1)
  local log = 'ntf:tx:' .. txid .. ':log'
  redis.call('RPUSH', log, cjson.encode({at = tonumber(now), event = outcome .. '_suppressed',
                                         source = source}))
  redis.call('EXPIRE', log, retention)
  count(field)
  return outcome, txid
end
local function accept(k, a)
  local txid, hash, source = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local tx, dedup, idem = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  if dedup ~= '' then
    local orig = redis.call('GET', dedup)
    if orig then return suppressed('duplicate', orig, ARGV[a + 4], source) end
  end
  if idem ~= '' then
    local prior = redis.call('GET', idem)
    if prior then
      local sep = string.find(prior, '|', 1, true)
      local first, first_hash = string.sub(prior, 1, sep - 1), string.sub(prior, sep + 1)
      if first_hash == hash then return suppressed('replay', first, ARGV[a + 5], source) end
      return 'conflict', first
    end
  end
  redis.call('HSET', tx, 'id', txid, 'source', source, 'status', ARGV[7], ARGV[a + 6], ARGV[a + 7],
             'created_at', now, 'updated_at', now, 'receiver', ARGV[a + 8])
  redis.call('EXPIRE', tx, retention)
  if dedup ~= '' then redis.call('SET', dedup, txid, 'PX', ARGV[3]) end
  if idem ~= '' then redis.call('SET', idem, txid .. '|' .. hash, 'EX', ARGV[4]) end
  outboxed[#outboxed + 1] = ARGV[5]
  outboxed[#outboxed + 1] = txid
  count(ARGV[a + 3])
  return 'new', txid
end
local events, per_message = (#KEYS - 3) / 3, tonumber(ARGV[6])
local out, queued, last = {}, {}, 0  -- queued: the messages to push, last: ARGV index of the latest
for i = 0, events - 1 do
  local outcome, txid = accept(4 + 3 * i, 8 + 9 * i)
  out[#out + 1] = outcome
  out[#out + 1] = txid
  local message = 8 + 9 * events + math.floor(i / per_message)
  if outcome == 'new' and message ~= last then
    queued[#queued + 1] = ARGV[message]
    last = message
  end
end
for field, n in pairs(counted) do redis.call('HINCRBYFLOAT', KEYS[2], field, n) end
if #outboxed > 0 then redis.call('ZADD', KEYS[1], unpack(outboxed)) end
if #queued > 0 then redis.call('LPUSH', KEYS[3], unpack(queued)) end
"""

ACCEPT = _ACCEPT_EVENTS + "return out\n"

# A dead letter's replay: its event accepted again (as ACCEPT does, one event) and the dead
# letter taken off its list, together or not at all. Off the list only after the accept's
# writes: a script is not rolled back when it fails part way, so an accept that raises leaves
# the dead letter in place; and a replay whose reply is lost has either done both or neither.
# Only one of two concurrent replays of the same dead letter finds it.
# KEYS, ARGV: as ACCEPT's for one event, then ARGV: the replayed transaction's ID
# Returns: {} when it is not (or no longer) a dead letter, else ACCEPT's reply
REPLAY = f"""
local replayed = ARGV[#ARGV]
if not redis.call('ZSCORE', '{DEADLETTERS}', replayed) then return {{}} end
""" + _ACCEPT_EVENTS + f"""
redis.call('ZREM', '{DEADLETTERS}', replayed)
return out
"""

_ADD = """
-- add(k0, a0[, n]): create the deliveries described from KEYS[k0] / ARGV[a0] on, in pairs
-- (KEYS: its hash, its transaction's delivery list; ARGV: id, JSON object of its fields), each
-- only if it does not exist yet; n of them (default: up to the last KEYS). KEYS[1] is the open
-- index, ARGV[1] retention_s, ARGV[2] now.
local function add(k0, a0, n)
  local created = {}
  for i = 0, (n or (#KEYS - k0 + 1) / 2) - 1 do
    local key, list = KEYS[k0 + 2 * i], KEYS[k0 + 1 + 2 * i]
    local id, fields = ARGV[a0 + 2 * i], cjson.decode(ARGV[a0 + 1 + 2 * i])
    if redis.call('HEXISTS', key, 'transaction_id') == 0 then
      local flat = {}
      for name, value in pairs(fields) do
        flat[#flat + 1] = name
        flat[#flat + 1] = value
      end
      redis.call('HSET', key, unpack(flat))  -- one command, not one per field
      redis.call('EXPIRE', key, ARGV[1])
      redis.call('RPUSH', list, id)
      redis.call('EXPIRE', list, ARGV[1])
      redis.call('ZADD', KEYS[1], ARGV[2], id)
      table.insert(created, id)
    end
  end
  return created
end
"""

_NOTE = """
local function note(log, entry, retention)
  redis.call('RPUSH', log, entry)
  redis.call('LTRIM', log, -500, -1)
  redis.call('EXPIRE', log, retention)
end
"""

ADD_DELIVERIES = _ADD + """
-- KEYS: open index, then per delivery: its hash, its transaction's delivery list
-- ARGV: retention_s, now, then per delivery: id, JSON object of its fields
return add(2, 3)
"""

FALL_BACK = _ADD + """
-- A failed delivery's way on, checked and created in one step. Keyed on the transaction and
-- the recipient: a live delivery (not failed, not fallen back) to them carries the message, and
-- nothing is created, when it is
--  - on the same channel to another of their addresses (a second push token): one dead device
--    must not page the person again on the next channel while their other device is reached;
--  - on the fallback channel (not for a digest, which goes on as a digest of its own): two of
--    their deliveries failing at once in two workers (sms and push) must not both create one.
-- The carried delivery is marked `carried_by` here, in the same step, and a delivery so marked
-- is not live: of two of a person's devices failing at once, the second to get here then sees
-- the first one dead and goes on, instead of each taking the other to carry it while neither
-- does. (Its status, count and history follow in the worker's next write; a worker killed
-- before that leaves it as it was, for the redelivered task, the reaper or the receipt applied
-- again to finish, as before.)
-- KEYS: open index, the transaction's delivery list, the failed delivery's hash,
--       then per successor: hash, delivery list
-- ARGV: retention_s, now, recipient, fallback channel ('' when none is left), the statuses
--       that are not live (comma list), the failed delivery's id, channel and digest_of (JSON),
--       then per successor: id, JSON object of its fields
-- Returns {the carrying delivery's id, its channel} or {'', the ids created...}.
local dead = {}
for name in string.gmatch(ARGV[5], '[^,]+') do dead[name] = true end
local digest = ARGV[8] ~= '[]'
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local d = redis.call('HMGET', 'ntf:dl:' .. id, 'recipient', 'channel', 'status', 'digest_of',
                      'carried_by')
  -- (one marked carried that was sent after all, by its redelivered task, reached them)
  local carried = d[5] and d[3] ~= 'sent' and d[3] ~= 'delivered'
  if id ~= ARGV[6] and d[1] == ARGV[3] and d[3] and not dead[d[3]] and not carried
      and ((d[2] == ARGV[7] and (d[4] or '[]') == ARGV[8]) or (not digest and d[2] == ARGV[4])) then
    redis.call('HSET', KEYS[3], 'carried_by', id)
    return {id, d[2]}
  end
end
local out = {''}
for _, id in ipairs(add(4, 9)) do out[#out + 1] = id end
return out
"""

FAN_OUT = _ADD + _NOTE + """
-- A dispatch's whole write, one round trip and all or nothing: the transaction's status, its
-- deliveries, the history line, and off the outbox (the reaper watches the deliveries now).
-- KEYS: open index, transaction, its log, outbox, then per delivery: hash, delivery list
-- ARGV: retention_s, now, txid, status, log entry (JSON), then per delivery: id, JSON fields
redis.call('HSET', KEYS[2], 'status', ARGV[4], 'updated_at', ARGV[2])
local created = add(5, 6)
note(KEYS[3], ARGV[5], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[3])
return created
"""

MOVE_IF_UNCHANGED = """
-- Sorted-set entries moved to a new score, or removed (new score ''), each only if its score is
-- still the one read: something that wrote it since (a worker re-scoring an open delivery, a
-- timer rescheduled) knows better than the reader. Serves the reaper's re-scores of the open
-- index and the scheduler's settling of the timers it fired.
-- KEYS: the sorted set; ARGV: per entry: member, its score as read, its new score or ''
for i = 1, #ARGV, 3 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    end
  end
end
return 0
"""

CLAIM = """
-- KEYS: delivery; ARGV: token, now, lease_s, '1' to return the transaction's fields too
-- Returns {result} or, for claimed / reclaimed / done, {result, the delivery's fields (after
-- the claim), its transaction's fields or {}}: the caller needs no second read.
local st = redis.call('HMGET', KEYS[1], 'status', 'claim_token', 'claim_at', 'transaction_id',
                     'digest_id')
local status = st[1]
if not status then return {'missing'} end
local function loaded(result)
  local tx = {}
  if ARGV[4] == '1' and st[4] then tx = redis.call('HGETALL', 'ntf:tx:' .. st[4]) end
  return {result, redis.call('HGETALL', KEYS[1]), tx}
end
local result = 'claimed'
if status == 'sending' then
  local stale = (tonumber(ARGV[2]) - tonumber(st[3] or '0')) > tonumber(ARGV[3])
  if st[2] ~= ARGV[1] and not stale then return {'busy'} end
  result = 'reclaimed'
elseif status ~= 'queued' and status ~= 'retrying' and status ~= 'deferred' then
  return {'done', redis.call('HGETALL', KEYS[1]), {}}
end
-- Merged into a digest that has not ended yet: the digest sends it, never a task of its own (a
-- reaper's re-queue or a redelivery arriving after the merge would send it twice).
if st[5] and st[5] ~= '' then return {'merged'} end
redis.call('HSET', KEYS[1], 'status', 'sending', 'claim_token', ARGV[1], 'claim_at', ARGV[2],
           'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
return loaded(result)
"""

MERGE = _ADD + """
-- Merge held deliveries into a new digest delivery, only if every one is still held (deferred,
-- in no digest): one claimed meanwhile by another task would go out alone and in the digest.
-- All or nothing: the digest, each member's digest_id, the members off the held set.
-- KEYS: open index, digest hash, its transaction's delivery list, held set, then member hashes
-- ARGV: retention_s, now, digest id, digest fields (JSON), then the member ids
-- Returns 1 when merged, 0 when a member moved on meanwhile (nothing written: read again)
for i = 5, #KEYS do
  local st = redis.call('HMGET', KEYS[i], 'status', 'digest_id')
  if st[1] ~= 'deferred' or (st[2] and st[2] ~= '') then return 0 end
end
add(2, 3, 1)
for i = 5, #KEYS do
  redis.call('HSET', KEYS[i], 'digest_id', ARGV[3], 'reason', 'merged into digest ' .. ARGV[3],
             'updated_at', ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
return 1
"""

SETTLE_MERGED = RECOUNT + """
-- A digest ended (sent, delivered, failed): settle the deliveries still merged into it, and
-- only those (idempotent: a redelivered task or the reaper may run it again after a crash),
-- each counted in the deliveries counter under its new outcome (the same script: once). A
-- digest that failed after it was sent (a failed SMS receipt, its fallback failed too) also
-- fails the members its send had settled as carried (suppressed): they never reached anyone.
-- KEYS: the deliveries counter, its revisions counter, then the members' hashes
-- ARGV: the status to give them, now, then per member: its counter series for that status
-- Returns each member's transaction id ('' for one gone), to be rolled up
local out = {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local st = redis.call('HMGET', key, 'status', 'digest_id', 'transaction_id')
  if (st[1] == 'deferred' or (st[1] == 'suppressed' and ARGV[1] == 'failed'))
      and st[2] and st[2] ~= '' then
    redis.call('HSET', key, 'status', ARGV[1], 'updated_at', ARGV[2])
    redis.call('HDEL', key, 'next_at')
    recount(key, KEYS[1], KEYS[2], ARGV[i])
  end
  out[i - 2] = st[3] or ''
end
return out
"""

DELIVERIES_OF = """
-- KEYS: a transaction's delivery list. Every delivery on it, as its hash's fields, in order.
local out = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  table.insert(out, redis.call('HGETALL', 'ntf:dl:' .. id))
end
return out
"""

_VERDICT = _NOTE + RECOUNT + """
-- write_status(txid, status, now, retention, v): a transaction's status write; when the status
-- is a verdict (delivered, partial, failed) other than the one it is counted under, also its
-- finished_at, history line and finished counter (the old verdict's series goes up in the
-- revisions counter: see notifier.ledger_counts), and its dead letter: added when the verdict
-- becomes failed, taken off when it becomes delivered or partial (a failed SMS receipt then
-- a fallback that reached the person: replaying it would page them twice). Keyed on the
-- verdict changing, not on the first terminal status: an SMS counted sent makes its transaction
-- delivered, and a failed receipt may still make it failed.
-- KEYS: transaction, its log, dead letters, open index, finished counter, its revisions counter
-- ARGV from v on: for delivered, partial, failed: history entry, counter series
-- Returns 1 when the verdict changed, else 0.
local function write_status(txid, status, now, retention, v)
  local known = {delivered = v, partial = v + 2, failed = v + 4}
  local before = redis.call('HMGET', KEYS[1], 'status', 'finished_at', '""" + COUNTED + """')
  redis.call('HSET', KEYS[1], 'status', status, 'updated_at', now)
  local k = known[status]
  if not k then return 0 end
  if before[2] and not before[3] and known[before[1]] then
    -- Finished by a version that did not write it down: it counted its status then.
    redis.call('HSET', KEYS[1], '""" + COUNTED + """', ARGV[known[before[1]] + 1])
  end
  if not recount(KEYS[1], KEYS[5], KEYS[6], ARGV[k + 1]) then return 0 end
  redis.call('HSET', KEYS[1], 'finished_at', now)
  note(KEYS[2], ARGV[k], retention)
  if status == 'failed' then
    redis.call('ZADD', KEYS[3], now, txid)
  else
    redis.call('ZREM', KEYS[3], txid)
  end
  return 1
end
"""

FINISH = _VERDICT + """
-- Set a transaction's status (write_status: a new verdict is counted, failed dead-lettered) and
-- take the given deliveries off the open index. One round trip, all or nothing.
-- KEYS: write_status's
-- ARGV: txid, status, now, retention_s, then write_status's six, then the delivery ids to take
--       off the open index
local changed = write_status(ARGV[1], ARGV[2], ARGV[3], ARGV[4], 5)
for i = 11, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
return changed
"""

ROLL_UP = _VERDICT + """
-- A transaction's status from its deliveries' statuses, decided and written in one step, so
-- two workers finishing its last deliveries at once cannot write an older verdict over a newer
-- one. The rule is `pipeline.rollup.status_of` (tests/integration/test_rollup_script.py walks
-- both over every combination): no deliveries -> failed; any not terminal -> dispatching;
-- otherwise every leaf (not fallen_back) reached -> delivered, some -> partial, none -> failed.
-- Then the write of FINISH.
-- KEYS: write_status's, then the delivery list
-- ARGV: txid, now, retention_s, terminal delivery statuses (comma list), reached ones, the
--       fallen-back status, then write_status's six; then the delivery ids to take off the
--       open index
local function set(csv)
  local out = {}
  for name in string.gmatch(csv, '[^,]+') do out[name] = true end
  return out
end
local terminal, reached = set(ARGV[4]), set(ARGV[5])
local n, open, leaves, hits = 0, false, 0, 0
for _, id in ipairs(redis.call('LRANGE', KEYS[7], 0, -1)) do
  local s = redis.call('HGET', 'ntf:dl:' .. id, 'status')
  if s then
    n = n + 1
    if not terminal[s] then
      open = true
    elseif s ~= ARGV[6] then
      leaves = leaves + 1
      if reached[s] then hits = hits + 1 end
    end
  end
end
local status = 'failed'
if n > 0 and open then
  status = 'dispatching'
elseif n > 0 and hits == leaves then
  status = 'delivered'
elseif hits > 0 then
  status = 'partial'
end
local changed = write_status(ARGV[1], status, ARGV[2], ARGV[3], 7)
for i = 13, #ARGV do redis.call('ZREM', KEYS[4], ARGV[i]) end
return {status, changed}
"""
