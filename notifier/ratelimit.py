"""Fleet-wide rate limits: token buckets in Redis, taken all-or-nothing by one Lua script.

Celery's own `rate_limit` is per worker process, so the fleet shares its buckets here. One
script call takes `cost` from every bucket of a send (e.g. the channel bucket plus this
recipient's minute and day buckets) or from none of them, and when it refuses it says how long
until *all* of them would say yes, so the delivery is deferred by that much instead of slept on.

Each bucket enforces two rules, both on Redis' clock (`redis.call('TIME')`), so worker clocks
and their skew never matter:

* a token bucket: holds at most `capacity` (= burst) tokens and refills `rate` per `per`,
  continuously; this gives the steady rate and lets capacity come back gradually;
* a rolling window: at most `max(rate, capacity)` taken in any window of length `per`.
  A token bucket alone lets `capacity + rate` through in one `per` (drain the burst, then
  spend what refills meanwhile), so "50 per 1d, burst 50" would let a recipient receive ~100
  SMS in 24 h and trip the provider's own per-number day limit. The window (a sorted set of
  recent takes, at most `max(rate, capacity)/cost` members) closes that gap: it is exactly
  "never more than 50 in any rolling day", and each slot comes back 24 h after it was used
  rather than all at midnight.

A refused take writes nothing. Both keys of a bucket expire once the bucket would be full and
its window empty again, so idle recipients cost no memory (a missing key *is* a full bucket).
Redis errors propagate: nobody is let through on a guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

from notifier.config import RateLimit
from notifier.redis_conn import queue_script

# Float noise from refill arithmetic must not turn "exactly one token" into a refusal.
_EPSILON = 1e-9

_COMMON = """
local now
do
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local EPS = 1e-9

local function cost_of(member)  -- members are "<seq>:<cost>"
  return tonumber(string.match(member, ':(.*)$'))
end

-- State of bucket i as of `now`: tokens after refill, and what the window holds. The hash keeps
-- `used`, the sum of every take in the zset, so only the takes that left the window since the
-- last write are read here (each once), not the whole window: a take costs O(1) amortised
-- however high the limit.
local function load(i)
  local hkey, zkey = KEYS[2 * i - 1], KEYS[2 * i]
  local base = 1 + (i - 1) * 4
  local cap, rate = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local per, wcap = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local h = redis.call('HMGET', hkey, 'tokens', 'ts', 'used')
  local tokens = cap
  if h[1] then
    tokens = math.min(cap, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * rate)
  end
  -- A take at time ts counts while ts > now - per.
  local cutoff = string.format('%.6f', now - per)
  local stored = 0
  if h[3] then
    stored = tonumber(h[3])
  else  -- a window written before `used` was kept: count it once
    for _, member in ipairs(redis.call('ZRANGE', zkey, 0, -1)) do stored = stored + cost_of(member) end
  end
  local gone = 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff)) do
    gone = gone + cost_of(member)
  end
  return {hkey = hkey, zkey = zkey, cap = cap, rate = rate, per = per, wcap = wcap,
          tokens = tokens, cutoff = cutoff, used = math.max(0, stored - gone)}
end

-- Seconds until `excess` worth of the window's oldest takes have left it.
local function freed_after(b, excess)
  local freed, offset = 0, 0
  while true do
    local page = redis.call('ZRANGEBYSCORE', b.zkey, '(' .. b.cutoff, '+inf', 'WITHSCORES',
                            'LIMIT', offset, 32)
    if #page == 0 then return 0 end
    for j = 1, #page, 2 do
      freed = freed + cost_of(page[j])
      if freed + EPS >= excess then return tonumber(page[j + 1]) + b.per - now end
    end
    offset = offset + 32
  end
end
"""

# KEYS: per bucket, its state hash and its window zset; optionally last, a "behind" key.
# ARGV: cost, then per bucket: capacity, refill per second, per (s), window capacity.
# Returns {1, "0", 0, then per bucket the window entry written} when taken, or
# {0, wait_seconds, index of the bucket that waits longest}, or {0, wait_seconds, -1} when the
# "behind" key holds a time still ahead (see `take`).
_TAKE = (
    _COMMON
    + """
local cost = tonumber(ARGV[1])
local n = (#ARGV - 1) / 4
if #KEYS > 2 * n then
  local tail = tonumber(redis.call('GET', KEYS[#KEYS]) or '0')
  if tail > now then return {0, string.format('%.6f', tail - now), -1} end
end
local buckets = {}
local wait, limiting = 0, 0
for i = 1, n do
  local b = load(i)
  buckets[i] = b
  local w = 0
  if b.tokens + EPS < cost then
    w = (cost - b.tokens) / b.rate
  end
  local excess = b.used + cost - b.wcap
  if excess > EPS then
    w = math.max(w, freed_after(b, excess))
  end
  if w > wait then
    wait, limiting = w, i
  end
end
if limiting > 0 then
  return {0, string.format('%.6f', wait), limiting}
end
local out = {1, '0', 0}
for i = 1, n do
  local b = buckets[i]
  local left = b.tokens - cost
  local seq = redis.call('HINCRBY', b.hkey, 'seq', 1)
  local stamp = string.format('%.6f', now)
  redis.call('HSET', b.hkey, 'tokens', string.format('%.17g', left), 'ts', stamp,
             'used', string.format('%.17g', b.used + cost))
  redis.call('ZREMRANGEBYSCORE', b.zkey, '-inf', b.cutoff)
  out[3 + i] = seq .. ':' .. string.format('%.17g', cost)
  redis.call('ZADD', b.zkey, stamp, out[3 + i])
  -- Idle keys go once the bucket is full and the window empty: absent == full.
  local ttl = math.ceil(math.max((b.cap - left) / b.rate, b.per) * 1000)
  redis.call('PEXPIRE', b.hkey, ttl)
  redis.call('PEXPIRE', b.zkey, ttl)
end
return out
"""
)

# A take undone: its tokens back in each bucket and its entry out of each window, where that
# entry is still in the window (one that left it has given its slot back already, and a bucket
# whose keys expired is full). The keys' expiry stays: a fuller bucket needs no longer.
# KEYS, ARGV: as the take's (without "behind"), then ARGV: per bucket, the window entry it wrote.
_GIVE_BACK = (
    _COMMON
    + """
local cost = tonumber(ARGV[1])
local n = #KEYS / 2
for i = 1, n do
  local b = load(i)
  local member = ARGV[1 + 4 * n + i]
  local score = redis.call('ZSCORE', b.zkey, member)
  if score and tonumber(score) > now - b.per then
    redis.call('ZREMRANGEBYSCORE', b.zkey, '-inf', b.cutoff)
    redis.call('ZREM', b.zkey, member)
    redis.call('HSET', b.hkey, 'tokens', string.format('%.17g', math.min(b.cap, b.tokens + cost)),
               'ts', string.format('%.6f', now),
               'used', string.format('%.17g', math.max(0, b.used - cost)))
  end
end
return 0
"""
)

# Read-only: what could be taken from bucket 1 right now (min of tokens and window room).
_LEVEL = (
    _COMMON
    + """
local b = load(1)
return string.format('%.17g', math.max(0, math.min(b.tokens, b.wcap - b.used)))
"""
)


@dataclass(frozen=True)
class Bucket:
    key: str  # e.g. "sms" or "sms:+8613800138000:0"
    limit: RateLimit

    def __post_init__(self) -> None:
        if not self.limit.per > 0:
            raise ValueError(f"bucket {self.key}: `per` must be a positive duration")

    @property
    def window_capacity(self) -> float:
        """Most that may be taken in any rolling `per` (see the module docstring)."""
        return max(self.limit.rate, self.limit.capacity)

    def _args(self) -> list[str]:
        limit = self.limit
        return [repr(float(v)) for v in (limit.capacity, limit.refill_per_second, limit.per)] + [
            repr(float(self.window_capacity))
        ]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float  # seconds until it would be allowed (0 when allowed)
    limiting: str | None  # key of the bucket that said no
    behind: bool = False  # refused because of the `behind` key, not for want of tokens
    taken: tuple[str, ...] = ()  # allowed: the window entry written in each bucket (give_back)


class TokenBuckets:
    def __init__(self, redis: redis.Redis, prefix: str = "ntf:tb:") -> None:
        self._redis = redis
        self._prefix = prefix
        # register_script: EVALSHA, with a NOSCRIPT fallback to load it (e.g. after a restart).
        self._take = redis.register_script(_TAKE)
        self._level = redis.register_script(_LEVEL)
        self._give_back = redis.register_script(_GIVE_BACK)

    def _keys(self, bucket: Bucket) -> list[str]:
        return [f"{self._prefix}{bucket.key}", f"{self._prefix}{bucket.key}:w"]

    def take(self, buckets: Sequence[Bucket], cost: float = 1.0, *, behind: str | None = None
             ) -> Decision:
        """Take `cost` from every bucket, or from none and say how long until all would allow.

        `behind`: a key holding a time (epoch seconds, e.g. the tail of a queue of deferred
        takers): while it is in the future, take nothing and answer `behind=True`; checked in
        the same script, so a caller that must queue behind others needs no extra round trip."""
        call = self._call(buckets, cost, behind)
        if isinstance(call, Decision):
            return call
        return self._decision(buckets, self._take(keys=call[0], args=call[1]))

    def queue_take(self, pipe: Pipeline, buckets: Sequence[Bucket], cost: float = 1.0, *,
                   behind: str | None = None) -> Callable[[Sequence[Any]], Decision]:
        """`take` queued on a pipeline the caller runs anyway (one round trip for this and
        reads of the same step); give the returned function that pipeline's replies."""
        call = self._call(buckets, cost, behind)
        if isinstance(call, Decision):
            decided = call
            return lambda _replies: decided
        at = len(pipe)
        queue_script(pipe, _TAKE, call[0], call[1])
        return lambda replies: self._decision(buckets, replies[at])

    def _call(self, buckets: Sequence[Bucket], cost: float, behind: str | None
              ) -> Decision | tuple[list[str], list[str]]:
        """The take script's KEYS and ARGV, or the decision when no call is needed."""
        if not buckets:
            return Decision(True, 0.0, None)
        if cost <= 0:
            raise ValueError("cost must be positive")
        for bucket in buckets:
            if cost > min(bucket.limit.capacity, bucket.window_capacity) + _EPSILON:
                return Decision(False, math.inf, bucket.key)  # can never fit: don't defer forever
        keys: list[str] = []
        args: list[str] = [repr(float(cost))]
        for bucket in buckets:
            keys += self._keys(bucket)
            args += bucket._args()
        if behind is not None:
            keys.append(behind)
        return keys, args

    @staticmethod
    def _decision(buckets: Sequence[Bucket], reply: Any) -> Decision:
        allowed, wait, index, *taken = reply
        if int(allowed):
            return Decision(True, 0.0, None, taken=tuple(
                entry.decode() if isinstance(entry, bytes) else str(entry) for entry in taken))
        if int(index) < 0:
            return Decision(False, float(wait), None, behind=True)
        return Decision(False, float(wait), buckets[int(index) - 1].key)

    def give_back(self, buckets: Sequence[Bucket], decision: Decision, cost: float = 1.0, *,
                  into: Pipeline | None = None) -> None:
        """Undo an allowed take of `cost` from `buckets` whose message was never sent (no
        request made), so it does not count against the limits. `into`: queue it on a pipeline
        the caller runs anyway."""
        if not decision.taken:
            return
        call = self._call(buckets, cost, None)
        if isinstance(call, Decision):
            return
        keys, args = call[0], [*call[1], *decision.taken]
        if into is not None:
            queue_script(into, _GIVE_BACK, keys, args)
        else:
            self._give_back(keys=keys, args=args)

    def level(self, bucket: Bucket) -> float:
        """How much could be taken from `bucket` now (tokens, capped by its rolling window)."""
        return float(self._level(keys=self._keys(bucket), args=["0", *bucket._args()]))
