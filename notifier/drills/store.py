"""A drill's state in Redis: one hash per drill, plus its sends and its timeline.

Hash fields: `def` (the definition, JSON), `current` (index of the live phase, -1 before the
first), `finished_at`, per phase `p<i>:started_at` / `p<i>:ended_at` / `p<i>:r<round>` (an
escalation round fired), per phase and timer round `p<i>:r<round>:failures` /
`...:first_failed_at` (a step failing, being retried), `...:given_up` (JSON: it was given
up) and `...:attempt` ("<started at> <token>": an attempt at the step that has not ended, running
or dead), per phase and operator `p<i>|<op>|code`, `...|confirmed_at`,
`...|confirmed_via`, `...|confirmed_by`. Decisions that two processes could race on (starting a
phase, the first confirmation, firing a round, starting an attempt at a step) are single atomic
Redis operations.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from notifier.drills.model import Drill
from notifier.inbox import text
from notifier.scheduler import TIMERS, Timer

_PREFIX = "ntf:drill:"
INDEX = "ntf:drills"  # drill id -> created at
ACTIVE = "ntf:drills:active"  # drills not finished: replies with unknown codes are shown there
_START = """
-- KEYS: drill, timers; ARGV: index, now, timer member, timer due
if not redis.call('HGET', KEYS[1], 'def') then return 'missing' end
if redis.call('HGET', KEYS[1], 'finished_at') then return 'finished' end
local field = 'p' .. ARGV[1] .. ':started_at'
if redis.call('HGET', KEYS[1], field) then return 'started' end
local current = tonumber(redis.call('HGET', KEYS[1], 'current') or '-1')
if current >= tonumber(ARGV[1]) then return 'passed' end
if current >= 0 then redis.call('HSET', KEYS[1], 'p' .. current .. ':ended_at', ARGV[2]) end
redis.call('HSET', KEYS[1], field, ARGV[2], 'current', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 'ok'
"""
_FINISH = """
-- KEYS: drill, active; ARGV: now, id
if not redis.call('HGET', KEYS[1], 'def') then return 'missing' end
if redis.call('HGET', KEYS[1], 'finished_at') then return 'finished' end
local current = tonumber(redis.call('HGET', KEYS[1], 'current') or '-1')
if current >= 0 then redis.call('HSET', KEYS[1], 'p' .. current .. ':ended_at', ARGV[1]) end
redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 'ok'
"""

_CONFIRM = """
-- KEYS: drill; ARGV: confirmed_at field, confirmed_via field, confirmed_by field, at, via, by,
-- phase ended_at field
-- A confirmation at or after its phase ended or the drill finished counts for nothing (-1): the
-- caller judged the phase live, but the lead may have moved on since (an API call racing it).
local ended = redis.call('HMGET', KEYS[1], ARGV[7], 'finished_at')
for _, t in ipairs(ended) do
  if t and tonumber(ARGV[4]) >= tonumber(t) then return -1 end
end
-- The earliest confirmation is the one: a reply stored before a confirmation by API, but
-- applied after it (workers busy), takes its place. Time, channel and sender in one write.
local was = redis.call('HGET', KEYS[1], ARGV[1])
if was and tonumber(was) <= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4], ARGV[2], ARGV[5], ARGV[3], ARGV[6])
return 1
"""
# KEYS: drill, then the lists to append to (sends, log); ARGV: field, value, ttl, keep, then one
# entry per list. A step that fails half-way and is re-fired finds both written or neither.
_SET_ONCE_APPEND = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 2, #KEYS do
  redis.call('RPUSH', KEYS[i], ARGV[i + 3])
  redis.call('LTRIM', KEYS[i], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return 1
"""
# KEYS: drill; ARGV: attempt field, failures field, first_failed_at field, now, token, limit.
# One attempt at a step at a time: ours starts unless another started less than `limit` ago (it
# may still be running). One that started longer ago never ended: its worker died. The one copy
# that replaces it counts it as a failure, in the same write, so that it is counted once.
_BEGIN_ATTEMPT = """
local was = redis.call('HGET', KEYS[1], ARGV[1])
local since = was and tonumber(string.match(was, '^%S+'))
if since and tonumber(ARGV[4]) < since + tonumber(ARGV[6]) then return {'busy', was} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4] .. ' ' .. ARGV[5])
if not since then return {'run'} end
redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4])
local failures = redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
return {'died', was, failures, redis.call('HGET', KEYS[1], ARGV[3])}
"""
# KEYS: drill; ARGV: attempt field, token, then fields to delete. Our attempt ended; one that
# took its place (ours was judged dead) is left alone.
_END_ATTEMPT = """
local was = redis.call('HGET', KEYS[1], ARGV[1])
if was and string.match(was, '%S+$') == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
for i = 3, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
"""
KEEP = 5000  # newest entries kept of a drill's sends and of its timeline


def op_field(phase: int, operator: str, what: str) -> str:
    return f"p{phase}|{operator}|{what}"


def step_field(phase: int, round_: int, what: str) -> str:
    return f"p{phase}:r{round_}:{what}"


@dataclass(frozen=True)
class Attempt:
    """What `begin_attempt` found: `run` (ours started), `busy` (another one started at `since`
    and may still be running: ours did not start) or `died` (one started at `since` never
    ended; ours started, and that one was counted: `failures` so far, the first at `first`)."""
    outcome: str
    since: float = 0.0
    failures: int = 0
    first: float = 0.0


class DrillStore:
    def __init__(self, client: redis.Redis, retention: float) -> None:
        self.redis = client
        self.retention = int(retention)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._confirm = client.register_script(_CONFIRM)
        self._set_once_append = client.register_script(_SET_ONCE_APPEND)
        self._begin_attempt = client.register_script(_BEGIN_ATTEMPT)
        self._end_attempt = client.register_script(_END_ATTEMPT)

    @staticmethod
    def key(drill_id: str) -> str:
        return _PREFIX + drill_id

    def _ttl(self, drill: Drill) -> int:
        return max(self.retention, int(drill.reply_code_ttl), 3600)

    def create(self, drill: Drill) -> None:
        key, ttl = self.key(drill.id), self._ttl(drill)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"def": json.dumps(drill.to_json(), ensure_ascii=False),
                                "current": "-1"})
        for suffix in ("", ":sends", ":log"):
            pipe.expire(key + suffix, ttl)
        pipe.zadd(INDEX, {drill.id: drill.created_at})
        pipe.zremrangebyscore(INDEX, "-inf", repr(drill.created_at - ttl))  # theirs expired
        pipe.sadd(ACTIVE, drill.id)
        pipe.execute()

    def drill(self, drill_id: str) -> Drill | None:
        raw = self.redis.hget(self.key(drill_id), "def")
        return None if raw is None else Drill.from_json(json.loads(text(raw)))

    def state(self, drill_id: str) -> dict[str, str]:
        return {text(k): text(v) for k, v in self.redis.hgetall(self.key(drill_id)).items()}

    def start_phase(self, drill_id: str, index: int, now: float, timer: Timer) -> str:
        """ok | started (someone else did) | passed (a later phase is live) | finished | missing.

        The phase's first timer (its announcement) is scheduled in the same atomic step, so a
        started phase is always announced even if this process dies right after."""
        return text(self._start(keys=[self.key(drill_id), TIMERS],
                                args=[index, repr(now), timer.member, repr(timer.due)]))

    def finish(self, drill_id: str, now: float) -> str:
        return text(self._finish(keys=[self.key(drill_id), ACTIVE], args=[repr(now), drill_id]))

    def is_live(self, drill_id: str, phase: int) -> bool:
        current, finished = self.redis.hmget(self.key(drill_id), ["current", "finished_at"])
        return finished is None and current is not None and int(text(current)) == phase

    def was_live(self, drill_id: str, phase: int, at: float) -> bool:
        """Was `phase` live at `at`: started by then, and neither ended (a later phase started,
        the drill finished) nor finished by then."""
        started, ended, finished = (
            None if v is None else float(text(v)) for v in self.redis.hmget(
                self.key(drill_id), [f"p{phase}:started_at", f"p{phase}:ended_at", "finished_at"]))
        return (started is not None and started <= at
                and all(end is None or at < end for end in (ended, finished)))

    def field(self, drill_id: str, name: str) -> str | None:
        value = self.redis.hget(self.key(drill_id), name)
        return None if value is None else text(value)

    def set_once(self, drill_id: str, name: str, value: str) -> bool:
        """True for the one caller that set it (first confirmation, a round fired, a code)."""
        return bool(self.redis.hsetnx(self.key(drill_id), name, value))

    def set_once_logged(self, drill: Drill, name: str, value: str, event: str, *,
                        send: dict[str, Any] | None = None, **detail: Any) -> bool:
        """`set_once`, logging `event` (and recording `send`) in the same atomic write: were
        they separate, a step re-run after failing in between would find the field set and
        never record the send (the report would show a delivered announcement as missing)."""
        key = self.key(drill.id)
        lists, entries = [key + ":log"], [{"at": time.time(), "event": event, **detail}]
        if send is not None:
            lists.insert(0, key + ":sends")
            entries.insert(0, send)
        return bool(self._set_once_append(
            keys=[key, *lists],
            args=[name, value, self._ttl(drill), KEEP,
                  *(json.dumps(e, ensure_ascii=False) for e in entries)]))

    def confirm(self, drill_id: str, phase: int, operator: str, *, at: float, via: str,
                by: str) -> bool | None:
        """Record that `operator` confirmed `phase` at `at`; True if this is now the
        confirmation (none yet, or only a later one), False if an earlier one stands, None if
        the phase had ended (or the drill finished) by `at`."""
        names = [op_field(phase, operator, what) for what in ("confirmed_at", "confirmed_via",
                                                               "confirmed_by")]
        done = int(self._confirm(keys=[self.key(drill_id)],
                                 args=[*names, repr(at), via, by, f"p{phase}:ended_at"]))
        return None if done < 0 else bool(done)

    def count_failure(self, drill_id: str, phase: int, round_: int, now: float
                      ) -> tuple[int, float]:
        """Count a failed run of a step: (failures so far, when the first of them happened)."""
        key, since = self.key(drill_id), step_field(phase, round_, "first_failed_at")
        pipe = self.redis.pipeline()  # MULTI: a concurrent run's count cannot interleave
        pipe.hsetnx(key, since, repr(now))
        pipe.hincrby(key, step_field(phase, round_, "failures"), 1)
        pipe.hget(key, since)
        _, failures, first = pipe.execute()
        return int(failures), float(text(first))

    def begin_attempt(self, drill_id: str, phase: int, round_: int, token: str, *, now: float,
                      limit: float) -> Attempt:
        """Record that attempt `token` at a step starts now, unless another one started less
        than `limit` ago; count one that started before that and never ended as a failure."""
        names = [step_field(phase, round_, what) for what in ("attempt", "failures",
                                                               "first_failed_at")]
        found = [text(x) if isinstance(x, bytes) else x for x in self._begin_attempt(
            keys=[self.key(drill_id)], args=[*names, repr(now), token, repr(limit)])]
        if found[0] == "run":
            return Attempt("run")
        since = float(str(found[1]).split(" ", 1)[0])
        if found[0] == "busy":
            return Attempt("busy", since)
        return Attempt("died", since, int(found[2]), float(str(found[3])))

    def end_attempt(self, drill_id: str, phase: int, round_: int, token: str, *,
                    completed: bool) -> None:
        """Attempt `token` ended (unless a copy took it for dead and replaced it). `completed`:
        the step is done, its failures are forgotten, so that a later copy of it that fails
        starts a retry window of its own instead of being given up at once for failures the
        completed run had outlived."""
        cleared = [step_field(phase, round_, what)
                   for what in ("failures", "first_failed_at")] if completed else []
        self._end_attempt(keys=[self.key(drill_id)],
                          args=[step_field(phase, round_, "attempt"), token, *cleared])

    def set(self, drill_id: str, **fields: str) -> None:
        self.redis.hset(self.key(drill_id), mapping=dict[Any, Any](fields))

    def sends(self, drill_id: str) -> list[dict[str, Any]]:
        return [json.loads(text(x)) for x in self.redis.lrange(self.key(drill_id) + ":sends", 0, -1)]

    def log(self, drill: Drill, event: str, *, at: float | None = None, **detail: Any) -> None:
        """`at`: when it happened, if not now (a reply: when it arrived, not when a worker
        applied it; the report's timeline is ordered by it)."""
        self._append(drill, ":log", {"at": time.time() if at is None else at, "event": event,
                                     **detail})

    def timeline(self, drill_id: str) -> list[dict[str, Any]]:
        return [json.loads(text(x)) for x in self.redis.lrange(self.key(drill_id) + ":log", 0, -1)]

    def _append(self, drill: Drill, suffix: str, entry: dict[str, Any]) -> None:
        key = self.key(drill.id) + suffix
        pipe = self.redis.pipeline()
        pipe.rpush(key, json.dumps(entry, ensure_ascii=False))
        pipe.ltrim(key, -KEEP, -1)
        pipe.expire(key, self._ttl(drill))
        pipe.execute()

    def active(self) -> list[str]:
        """Unfinished drills; forgets the ones whose records expired unfinished."""
        ids = sorted(text(x) for x in self.redis.smembers(ACTIVE))
        gone = [i for i in ids if not self.redis.exists(self.key(i))]
        if gone:
            self.redis.srem(ACTIVE, *gone)
        return [i for i in ids if i not in gone]

    def recent(self, limit: int = 50) -> list[str]:
        return [text(x) for x in self.redis.zrevrange(INDEX, 0, limit - 1)]
