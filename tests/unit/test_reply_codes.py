"""Reply matching: which SmsUp replies confirm a drill phase, and why the others do not.

A reply confirms only when the number it came from (86 / +86 / bare) is the one the code was
issued to, the code is within its lifetime, and its phase is live. Pure Python: the code
records and the live phases are plain data here.
"""

from __future__ import annotations

import pytest

from notifier.drills.codes import CodeRecord, Reason, candidate_codes, match_reply

NOW = 1_800_000_000.0
ALICE, BOB, STRANGER = "+8613800138000", "+8613900139000", "+8613700137000"


def record(code: str, drill: str, phase: int, operator: str, phone: str,
           expires_in: float = 3600.0, issued_ago: float = 60.0) -> CodeRecord:
    return CodeRecord(code=code, drill=drill, phase=phase, operator=operator, phone=phone,
                      issued_at=NOW - issued_ago, expires_at=NOW + expires_in)


CODES = {r.code: r for r in (
    record("472100", "dr-A", 0, "alice", ALICE),
    record("583211", "dr-A", 0, "bob", BOB),
    record("694322", "dr-A", 1, "alice", ALICE),  # a phase that is not live (yet / any more)
    record("705433", "dr-B", 0, "alice", ALICE),  # another drill, finished
    record("816544", "dr-A", 0, "alice", ALICE, expires_in=-1.0),  # expired a second ago
    record("927655", "dr-A", 0, "carol", ""),  # an operator without a phone
    # issued (its digits reused) after the reply arrived: the reply answered an older code
    record("038766", "dr-A", 0, "alice", ALICE, issued_ago=-60.0),
)}
LIVE = {("dr-A", 0)}


def judge(phone: str, text: str) -> tuple[Reason, str | None]:
    verdict = match_reply(phone, text, NOW, CODES.get, lambda d, p: (d, p) in LIVE)
    return verdict.reason, verdict.record.operator if verdict.record else None


@pytest.mark.parametrize(("phone", "text"), [
    ("8613800138000", "472100"),  # Aliyun's usual form: 86 without '+'
    ("+8613800138000", "472100"),
    ("13800138000", "472100"),  # bare mainland number
    ("138 0013 8000", "472100"),
    ("13800138000", "472100 确认"),
    ("13800138000", "确认472100"),
    ("13800138000", "确认 472100 收到"),
    ("13800138000", "OK 472100"),
    ("13800138000", "ok,472100."),
    ("13800138000", "  472100  "),
    ("13800138000", "４７２１００"),  # full-width digits (Chinese IME)
    ("13800138000", "４７２１００　确认"),  # ... and an ideographic space
    ("13800138000", "472 100"),  # split by a space
    ("13800138000", "472-100"),
    ("13800138000", "111111 472100"),  # a wrong number beside the right one
])
def test_reply_confirms(phone: str, text: str) -> None:
    assert judge(phone, text) == (Reason.CONFIRMED, "alice")


@pytest.mark.parametrize(("phone", "text", "reason"), [
    ("13800138000", "111111", Reason.UNKNOWN_CODE),  # wrong code
    ("13800138000", "472101", Reason.UNKNOWN_CODE),  # one digit off
    ("13800138000", "确认", Reason.NO_CODE),
    ("13800138000", "OK", Reason.NO_CODE),
    ("13800138000", "", Reason.NO_CODE),
    ("13800138000", "47210", Reason.NO_CODE),  # too short
    ("13800138000", "4721000", Reason.NO_CODE),  # too long: not a code with a digit added
    ("13800138000", "816544", Reason.EXPIRED_CODE),
    ("13800138000", "583211", Reason.WRONG_NUMBER),  # bob's code from alice's phone
    ("+8613700137000", "472100 确认", Reason.WRONG_NUMBER),  # alice's code, another number
    ("8613700137000", "927655", Reason.WRONG_NUMBER),  # an operator without a phone
    ("13800138000", "694322", Reason.NOT_LIVE),  # code of another phase of this drill
    ("13800138000", "038766", Reason.UNKNOWN_CODE),  # issued after the reply arrived
    ("13800138000", "705433", Reason.NOT_LIVE),  # code of another (finished) drill
    ("not-a-number", "472100", Reason.BAD_NUMBER),
    ("12", "472100", Reason.BAD_NUMBER),
])
def test_reply_is_rejected_with_its_reason(phone: str, text: str, reason: Reason) -> None:
    assert judge(phone, text)[0] is reason


def test_expiry_is_exact() -> None:
    code = record("123456", "dr-A", 0, "alice", ALICE, expires_in=10.0)
    lookup = {"123456": code}.get

    def live(drill: str, phase: int) -> bool:
        return True

    assert match_reply(ALICE, "123456", NOW + 9.999, lookup, live).confirmed
    assert match_reply(ALICE, "123456", NOW + 10.0, lookup, live).reason is Reason.EXPIRED_CODE


def test_most_telling_reason_wins_when_several_candidates_fail() -> None:
    # Bob's code and an unknown one from alice's phone: "wrong number" says more.
    assert judge(ALICE, "111111 583211")[0] is Reason.WRONG_NUMBER


@pytest.mark.parametrize(("text", "codes"), [
    ("472100 确认", ["472100"]),
    ("４７２１００", ["472100"]),
    ("123 456", ["123456"]),
    ("123456 654321", ["123456", "654321"]),
    ("123456 123456", ["123456"]),
    ("机房2 切换完成 472100", ["472100"]),
    ("١٢٣٤٥٦", []),  # other scripts' digits are not codes
    ("no digits", []),
])
def test_candidate_codes(text: str, codes: list[str]) -> None:
    assert candidate_codes(text) == codes
