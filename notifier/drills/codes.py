"""Reply codes: a short number per (drill, phase, operator) that an operator texts back.

Aliyun's `dest_code` is per signature, not per message, so a reply is matched by the phone
number it came from plus a code in its text, within the code's lifetime. A code is unique among
live codes fleet-wide, so it names exactly one (drill, phase, operator); its record outlives
its lifetime by a grace period, so that a stale reply is told apart from a wrong one.

Matching (`match_reply`) is plain Python over lookups handed in, so its table is unit-tested
without Redis.
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import redis

from notifier.config import normalise_phone
from notifier.inbox import text

CODE_DIGITS = 6
GRACE = 7 * 86400  # how long an expired code is still recognised as "expired"
# A reply's arrival is stamped by the API's clock, a code's issue by a worker's: no operator
# answers a code within this, so a reply this much "before" its code still counts.
CLOCK_SKEW = 5.0
_PREFIX = "ntf:rc:"
_ISSUE = """
-- KEYS: code; ARGV: now, expires_at, key_ttl_s, drill, phase, operator, phone
local live = redis.call('HGET', KEYS[1], 'expires_at')
if live and tonumber(live) > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'drill', ARGV[4], 'phase', ARGV[5], 'operator', ARGV[6],
           'phone', ARGV[7], 'issued_at', ARGV[1], 'expires_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RENEW = """
-- KEYS: code; ARGV: drill, phase, operator, expires_at, key_ttl_s
local owner = redis.call('HMGET', KEYS[1], 'drill', 'phase', 'operator', 'expires_at')
if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] or owner[3] ~= ARGV[3] then return 0 end
if tonumber(owner[4]) < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return 1
"""
_RUN = re.compile(r"[0-9]+")  # ASCII only: NFKC has already folded full-width digits
_SPACED = re.compile(r"(?<=[0-9])[\s\-.·]+(?=[0-9])")  # "123 456", "123-456"


@dataclass(frozen=True)
class CodeRecord:
    code: str
    drill: str
    phase: int
    operator: str
    phone: str  # E.164 of the operator when issued; "" when they have no phone
    issued_at: float
    expires_at: float


class Reason(StrEnum):
    CONFIRMED = "confirmed"
    BAD_NUMBER = "bad_number"  # the sender's number is not a phone number
    NO_CODE = "no_code"  # no number of the code's length in the text
    UNKNOWN_CODE = "unknown_code"  # never issued, or long gone
    EXPIRED_CODE = "expired_code"
    WRONG_NUMBER = "wrong_number"  # the code belongs to another operator's number
    NOT_LIVE = "phase_not_live"  # its drill finished or moved on to another phase


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    phone: str = ""  # normalised sender, when it could be read
    code: str = ""
    record: CodeRecord | None = None

    @property
    def confirmed(self) -> bool:
        return self.reason is Reason.CONFIRMED


def candidate_codes(content: str) -> list[str]:
    """Codes a reply text may carry: NFKC folds full-width digits and spaces; runs of exactly
    CODE_DIGITS digits count, and digits split by spaces are joined only when no run fits."""
    folded = unicodedata.normalize("NFKC", content)
    runs = [r for r in _RUN.findall(folded) if len(r) == CODE_DIGITS]
    if not runs:
        runs = [r for r in _RUN.findall(_SPACED.sub("", folded)) if len(r) == CODE_DIGITS]
    return list(dict.fromkeys(runs))


# When several candidates fail, report the most telling reason.
_RANK = [Reason.NOT_LIVE, Reason.EXPIRED_CODE, Reason.WRONG_NUMBER, Reason.UNKNOWN_CODE]


def match_reply(phone_raw: str, content: str, now: float,
                lookup: Callable[[str], CodeRecord | None],
                is_live: Callable[[str, int], bool]) -> Verdict:
    """Does this reply confirm a live (drill, phase, operator)? Never raises."""
    try:
        phone = normalise_phone(phone_raw)
    except ValueError:
        return Verdict(Reason.BAD_NUMBER)
    codes = candidate_codes(content)
    if not codes:
        return Verdict(Reason.NO_CODE, phone)
    rejections: list[Verdict] = []
    for code in codes:
        record = lookup(code)
        # Issued after the reply arrived: the reply answered an earlier code of the same digits
        # (long expired, the number reused since), not this one.
        if record is None or now + CLOCK_SKEW < record.issued_at:
            rejections.append(Verdict(Reason.UNKNOWN_CODE, phone, code))
        elif now >= record.expires_at:
            rejections.append(Verdict(Reason.EXPIRED_CODE, phone, code, record))
        elif not record.phone or record.phone != phone:
            rejections.append(Verdict(Reason.WRONG_NUMBER, phone, code, record))
        elif not is_live(record.drill, record.phase):
            rejections.append(Verdict(Reason.NOT_LIVE, phone, code, record))
        else:
            return Verdict(Reason.CONFIRMED, phone, code, record)
    return min(rejections, key=lambda v: _RANK.index(v.reason))


class ReplyCodes:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._issue = client.register_script(_ISSUE)
        self._renew = client.register_script(_RENEW)

    def issue(self, drill: str, phase: int, operator: str, *, phone: str, ttl: float,
              now: float | None = None) -> str:
        """A fresh code no live code shares (random, so codes cannot be guessed in sequence)."""
        at = time.time() if now is None else now
        for _ in range(50):
            code = str(secrets.randbelow(9 * 10 ** (CODE_DIGITS - 1)) + 10 ** (CODE_DIGITS - 1))
            args: list[str | int] = [repr(at), repr(at + ttl), int(ttl) + GRACE, drill, phase,
                                     operator, phone]
            if self._issue(keys=[_PREFIX + code], args=args):
                return code
        raise RuntimeError("no free reply code after 50 tries: too many live codes")

    def renew(self, code: str, drill: str, phase: int, operator: str, *, ttl: float,
              now: float | None = None) -> bool:
        """Keep a code that is sent again valid for `ttl` from now (never shortened). False
        when it no longer names (drill, phase, operator): it expired and went to someone else."""
        at = time.time() if now is None else now
        return bool(self._renew(keys=[_PREFIX + code],
                                args=[drill, str(phase), operator, repr(at + ttl),
                                      int(ttl) + GRACE]))

    def lookup(self, code: str) -> CodeRecord | None:
        raw = self.redis.hgetall(_PREFIX + code)
        if not raw:
            return None
        data = {text(k): text(v) for k, v in raw.items()}
        return CodeRecord(code=code, drill=data["drill"], phase=int(data["phase"]),
                          operator=data["operator"], phone=data.get("phone", ""),
                          issued_at=float(data["issued_at"]),
                          expires_at=float(data["expires_at"]))
