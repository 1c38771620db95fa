"""Circuit breakers whose state the whole worker fleet shares in Redis, one per provider.

The state machine is pybreaker's (Nygard's): CLOSED counts consecutive failures and a
success resets the count; at `fail_max` it trips OPEN; after `reset_timeout` it goes
HALF_OPEN; a trial success closes it, a trial failure re-opens it. `BreakerState.pybreaker`
gives pybreaker's state names for anything already keyed on them.

Why not `pybreaker.CircuitBreaker` over a Redis `CircuitBreakerStorage`: the storage interface
is get/set/incr of single fields, and the decisions are taken by `CircuitBreaker` in Python
*between* those calls (read counter, compare with fail_max, write state; read opened_at,
compare with the *local* clock, write half-open). However atomic each storage call, a fleet of
processes interleaves those steps. Half-open has no admission control at all (every process
that sees "half-open" calls the provider), and `CircuitBreaker.call` holds a process-wide lock
while the guarded call runs. pybreaker's own `CircuitRedisStorage` also answers
`fallback_circuit_state` (closed) when Redis errors, so an outage of Redis opens the floodgates
to a provider the fleet had just tripped on (tests/integration/test_breaker.py shows it).

So every transition here is one Lua script, on Redis' clock:
* `acquire` admits a call (CLOSED, FORCED_CLOSED), refuses it (OPEN before `retry_at`,
  FORCED_OPEN), or in HALF_OPEN hands out one of `half_open_trials` trial permits fleet-wide.
  A trial permit is a zset member that expires after `trial_ttl`, so a worker that dies mid
  trial frees its slot instead of wedging the breaker half-open.
* Each state change bumps a generation; a permit carries the generation it was issued in, and
  a result reported under an older generation is ignored (a call admitted before the breaker
  opened must not count against the trial that follows).
* Operators can force OPEN/CLOSED (results are then ignored) until `reset`; those actions go
  to a capped per-breaker history, and every state change goes to one fleet-wide stream
  (`EVENTS_KEY`) for the ledger and metrics.

Redis errors propagate (`redis.RedisError`): no call is ever admitted on a guess, and the
caller retries the delivery later. Nothing here is cached in process memory, so a restarted
Redis (AOF) resumes exactly where it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pybreaker
import redis
from redis.client import Pipeline

from notifier.config import BreakerPolicy
from notifier.errors import CircuitOpen
from notifier.redis_conn import queue_script

KEY_PREFIX = "ntf:breaker:"
REGISTRY_KEY = "ntf:breakers"
EVENTS_KEY = "ntf:breaker:events"
HISTORY_CAP = 100
EVENTS_CAP = 10_000

# KEYS: state hash, trial permits zset, history list, registry set, events stream.
# ARGV: op, name, fail_max, reset_timeout, half_open_trials, trial_ttl, permit generation,
#       permit kind, by, reason, history cap, events cap.
_SCRIPT = """
local H, TRIALS, HIST, REG, EVENTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, name = ARGV[1], ARGV[2]
local fail_max, reset_timeout = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_trials, trial_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function f6(x) return string.format('%.6f', x) end

redis.call('SADD', REG, name)  -- no-op (and not persisted) once registered
local cur = redis.call('HMGET', H, 'state', 'gen', 'failures', 'retry_at')
local state = cur[1] or 'closed'
local gen = tonumber(cur[2] or '0')
local failures = tonumber(cur[3] or '0')

local function move(to, by, reason)
  gen = gen + 1
  redis.call('HSET', H, 'state', to, 'gen', gen, 'changed_at', f6(now),
             'changed_by', by, 'reason', reason)
  redis.call('DEL', TRIALS)  -- permits of the old state are void
  if to == 'open' then
    redis.call('HSET', H, 'opened_at', f6(now), 'retry_at', f6(now + reset_timeout))
  elseif to == 'forced_open' then
    redis.call('HSET', H, 'opened_at', f6(now))
    redis.call('HDEL', H, 'retry_at')
  elseif to == 'half_open' then
    redis.call('HDEL', H, 'retry_at')
  else
    failures = 0
    redis.call('HSET', H, 'failures', 0)
    redis.call('HDEL', H, 'opened_at', 'retry_at')
  end
  redis.call('XADD', EVENTS, 'MAXLEN', '~', ARGV[12], '*', 'breaker', name, 'from', state,
             'to', to, 'at', f6(now), 'failures', failures, 'by', by, 'reason', reason)
  state = to
end

if op == 'acquire' then
  if state == 'forced_open' then return {0, '-1'} end
  if state == 'open' then
    local retry_at = tonumber(cur[4]) or 0
    if now < retry_at then return {0, f6(retry_at - now)} end
    move('half_open', '', 'reset timeout elapsed')
  end
  if state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', TRIALS, '-inf', f6(now))  -- permits of dead workers
    if redis.call('ZCARD', TRIALS) >= max_trials then
      local first = redis.call('ZRANGE', TRIALS, 0, 0, 'WITHSCORES')
      return {0, f6(math.min(tonumber(first[2]) - now, reset_timeout))}
    end
    local id = gen .. ':' .. redis.call('HINCRBY', H, 'seq', 1)
    redis.call('ZADD', TRIALS, f6(now + trial_ttl), id)
    redis.call('PEXPIRE', TRIALS, math.ceil(trial_ttl * 1000))
    return {1, gen, 'trial', id}
  end
  return {1, gen, 'normal', ''}
end

if op == 'success' or op == 'failure' then
  if tonumber(ARGV[7]) ~= gen then return 'stale' end
  local trial = ARGV[8] == 'trial' and state == 'half_open'
  if op == 'success' then
    if trial then
      move('closed', '', 'trial call succeeded')
    elseif state == 'closed' and failures ~= 0 then
      redis.call('HSET', H, 'failures', 0)
    end
  elseif trial then
    move('open', '', 'trial call failed')
  elseif state == 'closed' then
    failures = redis.call('HINCRBY', H, 'failures', 1)
    if failures >= fail_max then move('open', '', failures .. ' consecutive failures') end
  end
  return state
end

local targets = {force_open = 'forced_open', force_close = 'forced_closed', reset = 'closed'}
local to = targets[op]
if not to then return redis.error_reply('unknown breaker op ' .. op) end
local from = state
move(to, ARGV[9], ARGV[10])
redis.call('RPUSH', HIST, cjson.encode({action = op, by = ARGV[9], reason = ARGV[10],
                                        at = f6(now), from = from, to = to}))
redis.call('LTRIM', HIST, -tonumber(ARGV[11]), -1)
return to
"""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"

    @property
    def pybreaker(self) -> str:
        """pybreaker's name for this state (forced states behave as open / closed)."""
        if self in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            return str(pybreaker.STATE_OPEN)
        if self is BreakerState.HALF_OPEN:
            return str(pybreaker.STATE_HALF_OPEN)
        return str(pybreaker.STATE_CLOSED)


@dataclass(frozen=True)
class BreakerStatus:
    name: str
    state: BreakerState
    failures: int  # consecutive failures counted while closed
    opened_at: float | None  # Redis time (epoch seconds) it last opened
    retry_at: float | None  # when OPEN goes HALF_OPEN (None unless automatic OPEN)
    changed_by: str | None  # operator of the last forced change (None for automatic)
    reason: str | None
    changed_at: float | None = None


@dataclass(frozen=True)
class Permit:
    """Leave to make one provider call; hand it back with record_success/record_failure."""

    breaker: str
    generation: int
    trial: bool
    id: str = ""


def _text(value: bytes | str | int | None) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def _status(name: str, raw: dict[bytes | str, bytes | str]) -> BreakerStatus:
    fields = {_text(k): _text(v) for k, v in raw.items()}

    def number(key: str) -> float | None:
        return float(fields[key]) if fields.get(key) else None

    return BreakerStatus(
        name=name,
        state=BreakerState(fields.get("state") or BreakerState.CLOSED),
        failures=int(fields.get("failures") or 0),
        opened_at=number("opened_at"),
        retry_at=number("retry_at"),
        changed_by=fields.get("changed_by") or None,
        reason=fields.get("reason") or None,
        changed_at=number("changed_at"),
    )


class FleetBreaker:
    """One provider's breaker (e.g. "sms:aliyun"); cheap to create, holds no state itself.

    `trial_ttl` is how long a half-open trial permit lives if its holder never reports: keep it
    above the provider call's timeout; the task's hard time limit (60 s) is the natural value.
    """

    def __init__(
        self, redis: redis.Redis, name: str, policy: BreakerPolicy, *, trial_ttl: float = 60.0
    ) -> None:
        if trial_ttl <= 0:
            raise ValueError("trial_ttl must be positive")
        self._redis = redis
        self.name = name
        self.policy = policy
        self.trial_ttl = trial_ttl
        self._key = f"{KEY_PREFIX}{name}"
        self._script = redis.register_script(_SCRIPT)

    def _run(self, op: str, permit: Permit | None = None, by: str = "", reason: str = "",
             into: Pipeline | None = None) -> object:
        policy = self.policy
        keys = [self._key, f"{self._key}:trials", f"{self._key}:history", REGISTRY_KEY, EVENTS_KEY]
        args: list[str | int] = [
            op, self.name, policy.fail_max, repr(float(policy.reset_timeout)),
            policy.half_open_trials, repr(float(self.trial_ttl)),
            permit.generation if permit else -1, "trial" if permit and permit.trial else "normal",
            by, reason, HISTORY_CAP, EVENTS_CAP,
        ]  # fmt: skip
        if into is not None:
            queue_script(into, _SCRIPT, keys, args)
            return None
        return self._script(keys=keys, args=args)

    def acquire(self) -> Permit:
        """A permit to call the provider, or CircuitOpen (go to fallback without a call)."""
        reply = self._run("acquire")
        if not isinstance(reply, list):
            raise TypeError(f"unexpected reply from the breaker script: {reply!r}")
        if not int(reply[0]):
            wait = float(reply[1])
            raise CircuitOpen(self.name, None if wait < 0 else wait)
        return Permit(self.name, int(reply[1]), _text(reply[2]) == "trial", _text(reply[3]))

    def queue_peek(self, pipe: Pipeline) -> Callable[[Sequence[Any]], Permit | None]:
        """Read the state on a pipeline the caller runs anyway; give the returned function that
        pipeline's replies. It answers the permit `acquire` would give in CLOSED or
        FORCED_CLOSED, where acquiring only reads the generation (saving the script's round
        trip on every send), or None in any other state: then call `acquire`, which decides.
        The registration `acquire` does waits for the first result recorded."""
        at = len(pipe)
        pipe.hmget(self._key, "state", "gen")

        def permit(replies: Sequence[Any]) -> Permit | None:
            state, generation = (_text(value) for value in replies[at])
            if state in ("", BreakerState.CLOSED, BreakerState.FORCED_CLOSED):
                return Permit(self.name, int(generation or 0), False)
            return None

        return permit

    def record_success(self, permit: Permit, *, into: Pipeline | None = None) -> None:
        """`into`: queue it on the pipeline that records the send (one round trip for both)."""
        self._record("success", permit, into)

    def record_failure(self, permit: Permit) -> None:
        """Report a failure that says the provider is unwell (`DeliveryError.trips_breaker`)."""
        self._record("failure", permit)

    def _record(self, op: str, permit: Permit, into: Pipeline | None = None) -> None:
        if permit.breaker != self.name:
            raise ValueError(f"permit of breaker {permit.breaker!r} given to {self.name!r}")
        self._run(op, permit, into=into)

    def status(self) -> BreakerStatus:
        """As stored: an OPEN past `retry_at` turns HALF_OPEN at the next `acquire`."""
        return _status(self.name, self._redis.hgetall(self._key))

    def force_open(self, by: str, reason: str) -> BreakerStatus:
        """Refuse every call until `reset` (e.g. the provider announced maintenance)."""
        self._run("force_open", by=by, reason=reason)
        return self.status()

    def force_close(self, by: str, reason: str) -> BreakerStatus:
        """Admit every call and ignore failures until `reset`."""
        self._run("force_close", by=by, reason=reason)
        return self.status()

    def reset(self, by: str, reason: str = "reset") -> BreakerStatus:
        """Back to automatic: closed, counters cleared."""
        self._run("reset", by=by, reason=reason)
        return self.status()

    def history(self) -> list[dict[str, str]]:
        """Operator actions, oldest first (at most HISTORY_CAP)."""
        raw = self._redis.lrange(f"{self._key}:history", 0, -1)
        return [{k: str(v) for k, v in json.loads(item).items()} for item in raw]


def list_breakers(redis: redis.Redis) -> list[BreakerStatus]:
    """Every breaker ever used, by name, for /metrics and `notifier breakers`."""
    names = sorted(_text(n) for n in redis.smembers(REGISTRY_KEY))
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(f"{KEY_PREFIX}{name}")
    return [_status(name, raw) for name, raw in zip(names, pipe.execute(), strict=True)]


def breaker_events(
    redis: redis.Redis, after: str = "0-0", count: int = 100
) -> list[tuple[str, dict[str, str]]]:
    """State changes of all breakers after stream id `after`, oldest first: (id, fields)."""
    entries = redis.xrange(EVENTS_KEY, min=f"({after}", count=count) or []
    return [(_text(i), {_text(k): _text(v) for k, v in (f or {}).items()}) for i, f in entries]
