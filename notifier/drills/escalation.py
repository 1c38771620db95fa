"""A drill phase's timers: announce (round 0), escalate (1..N), record misses (N+1).

Timers fire at least once: the scheduler does not remove a drill timer when it publishes its
task but leases it (due again a minute later), and the step removes it only once it has
completed, so a step whose task died (a dead worker) runs again. Every step is
idempotent: each send goes through the intake with an
idempotency key and is recorded once (HSETNX), and the set of operators a round escalates for
is frozen by the first run of that round.

A step that fails (raises, or Redis refuses a send) is retried with exponential backoff, each
failure on the drill's timeline and in the log; it is given up once it has failed for as long
as its phase's deadline (an hour at most), and at the latest when the next round is due, which
then runs as if the step had completed: the next round re-sends to whoever has not confirmed,
so a failing announcement never holds up the escalations or the record of misses. A given-up
step is in the report. One recipient's failing send does not keep the step's other sends from
going out.

A step whose worker dies mid-run (SIGKILL, the OOM killer, Celery's hard time limit) never gets
to raise, so each attempt records its start on the drill (`p<i>:r<round>:attempt`, with a token)
and clears it when it ends, completed or failed. An attempt that started more than
`DrillService.attempt_limit` ago (the hard time limit and a margin: no task runs longer) and
never ended died. The next copy of the step to run (the lease's re-fire, or Celery's redelivery
of the killed task) counts it as a failed attempt, through the same backoff, timeline entry and
give-up as a step that raised, so the next rounds still run. A copy that finds an attempt
younger than that does not run the step: the attempt may still be running (a slow send), and
a step that kills its worker would otherwise be re-run, uncounted, each time Celery redelivers
it. It leaves the timer in place, brought forward to when that attempt must have ended, to look
again then. Finding, replacing and counting a dead attempt is one atomic write: concurrent
copies count a death once.

Each escalation round, at `started + deadline × round`, re-sends the SMS to every operator who
has not confirmed, on every other channel they can be reached on too (same reply code, valid
for another reply_code_ttl from the reminder), and tells the drill's escalation recipients who
has not confirmed.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from functools import partial

from notifier.drills import replies
from notifier.drills.model import Drill, human_duration
from notifier.drills.service import TIMER_PREFIX, DrillService
from notifier.drills.store import op_field, step_field
from notifier.errors import BrokerUnavailable, IdempotencyConflict, InvalidEvent
from notifier.models import Event, Source
from notifier.pipeline.fanout import addresses

log = logging.getLogger(__name__)
RETRY_IN = 5.0  # a step that failed is tried again this much later, doubled per failure...
RETRY_CAP = 300.0  # ...up to this
RETRY_WINDOW = 3600.0  # the longest a step is retried (shorter for a shorter phase deadline)
RETRY = "retry"
GIVEN_UP = "given_up"
BUSY = "busy"  # another attempt at the step is running (or has not yet been found dead)
ESCALATION = "escalation"  # the `who` of sends to the escalation recipients


def parse_timer(arg: str) -> tuple[str, int, int] | None:
    """'<drill id>:<phase>:<round>' -> (drill id, phase, round)."""
    parts = arg.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def fire_drill_timer(svc: DrillService, arg: str) -> str:
    """Run the step of timer `arg` ('<drill id>:<phase>:<round>'), then remove the timer: only
    now, so that the scheduler re-fires it if this raises half-way."""
    result = _step(svc, arg)
    # "retry" scheduled the timer again, for when it is to be retried; "busy" leaves it to the
    # attempt that is running, which removes it once done, and fires again should that one die.
    if result not in (RETRY, BUSY):
        svc.timer_done(arg)
    return result


class AttemptDied(Exception):
    """An attempt at a step started and never ended: its worker died (see the module's
    docstring). Counted as a failure of the step, as if it had raised this."""


def _step(svc: DrillService, arg: str) -> str:
    parsed = parse_timer(arg)
    if parsed is None:
        return f"bad drill timer {arg!r}"
    drill_id, phase, round_ = parsed
    drill = svc.store.drill(drill_id)
    if drill is None or phase >= len(drill.phases):
        return "missing"
    if not svc.is_live(drill.id, phase):
        return "phase_over"  # a later phase started, or the drill finished
    if svc.store.field(drill.id, step_field(phase, round_, GIVEN_UP)) is not None:
        return GIVEN_UP  # a copy queued before it was given up: the next round took over
    token, now = secrets.token_hex(8), time.time()
    attempt = svc.store.begin_attempt(drill.id, phase, round_, token, now=now,
                                      limit=svc.attempt_limit)
    if attempt.outcome == BUSY:
        # Look again once it must have ended: done, its timer is gone; dead, it is counted.
        svc.hasten(drill, phase, round_, attempt.since + svc.attempt_limit)
        return BUSY
    completed = False
    if attempt.outcome == "died":  # counted already (begin_attempt): retry or give it up
        died = AttemptDied(f"the attempt started {now - attempt.since:.0f} s ago did not finish "
                           "(its worker died, or was killed at the task time limit)")
        result = _failed(svc, drill, phase, round_, died,
                         counted=(attempt.failures, attempt.first))
    else:
        try:
            result = _fire(svc, drill, phase, round_)
            completed = result != RETRY
        except Exception as exc:  # whatever it is: retried with backoff, then given up
            # Everything done so far is recorded and idempotent: the whole step runs again.
            result = _failed(svc, drill, phase, round_, exc)
    # Not in a `finally`: an attempt cut short by SystemExit (the pool's SIGTERM at the hard
    # time limit) did not end, and must be found dead.
    svc.store.end_attempt(drill.id, phase, round_, token, completed=completed)
    return result


def _failed(svc: DrillService, drill: Drill, phase: int, round_: int, exc: Exception, *,
            counted: tuple[int, float] | None = None) -> str:
    """Retry the step with backoff, or give it up (see the module's docstring). `counted`:
    the failure was counted already (failures so far, when the first of them happened)."""
    now = time.time()
    failures, first = counted or svc.store.count_failure(drill.id, phase, round_, now)
    step, error = drill.step_name(round_), f"{type(exc).__name__}: {exc}"[:300]
    give_up_at = first + min(drill.phases[phase].deadline, RETRY_WINDOW)
    next_due = _round_due(svc, drill, phase, round_ + 1)
    if next_due is not None:
        give_up_at = min(give_up_at, next_due)
    where = f"drill {drill.id} phase {phase} {step} (round {round_})"
    if now >= give_up_at:
        log.error("%s given up after %d failed attempt(s): %s", where, failures, error)
        svc.store.set_once_logged(
            drill, step_field(phase, round_, GIVEN_UP),
            json.dumps({"at": now, "failures": failures, "error": error}), "step_given_up",
            phase=phase, round=round_, step=step, failures=failures, error=error)
        if next_due is not None:
            svc.schedule(drill, phase, round_ + 1, next_due)
        return GIVEN_UP
    delay = min(RETRY_IN * 2 ** min(failures - 1, 16), RETRY_CAP)
    retry_at = min(now + delay, give_up_at)  # the give-up is not put off by a long backoff
    svc.store.log(drill, "step_failed", phase=phase, round=round_, step=step, failure=failures,
                  error=error, retry_in=round(retry_at - now, 1))
    log.warning("%s failed (%d), retrying in %.0f s: %s", where, failures, retry_at - now, error,
                exc_info=not isinstance(exc, (BrokerUnavailable, AttemptDied)))
    svc.schedule(drill, phase, round_, retry_at)
    return RETRY


def _started(svc: DrillService, drill: Drill, phase: int) -> float:
    return float(svc.store.field(drill.id, f"p{phase}:started_at") or time.time())


def _round_due(svc: DrillService, drill: Drill, phase: int, round_: int) -> float | None:
    """When round `round_` of the phase is due; None past the round that records the misses."""
    if round_ > drill.escalation_rounds + 1:
        return None
    return _started(svc, drill, phase) + drill.phases[phase].deadline * round_


def _send_all(sends: Sequence[Callable[[], object]]) -> None:
    """Make every send even if one fails (one recipient's failure must not leave the others
    unpaged), then raise the first failure, so that the step is retried for the failed ones
    (the sends that went out are recorded: a retry repeats none)."""
    failure: Exception | None = None
    for send in sends:
        try:
            send()
        except Exception as exc:  # raised below, once the others had their turn
            failure = failure or exc
    if failure is not None:
        raise failure


def _fire(svc: DrillService, drill: Drill, phase: int, round_: int) -> str:
    started = _started(svc, drill, phase)
    deadline = drill.phases[phase].deadline
    if round_ == 0:
        _send_all([partial(_page, svc, drill, phase, op, 0) for op in drill.operators])
        svc.schedule(drill, phase, 1, started + deadline)
        return "announced"
    # A reply that arrived before this round may still wait in the inbox (workers busy): apply
    # it first, so that an operator who answered is neither chased nor reported as silent.
    replies.apply_due(svc)
    # One that another worker claimed and has not applied (busy, or killed: it comes due again
    # when that worker's lease runs out) may confirm someone too: wait for it, a lease at most.
    inbox = replies.reply_inbox(svc.redis, svc.settings.retention)
    if inbox.pending() and time.time() < started + deadline * round_ + inbox.lease:
        svc.schedule(drill, phase, round_, time.time() + RETRY_IN)
        return RETRY
    frozen, first_run = _frozen_pending(svc, drill, phase, round_)
    # Someone may have confirmed since the round was frozen: do not chase them again.
    pending = [op for op in frozen if op not in _confirmed(svc, drill, phase)]
    if not pending:
        return "all_confirmed"
    if round_ > drill.escalation_rounds:
        for op in pending:
            svc.store.set_once_logged(drill, op_field(phase, op, "missed"), repr(time.time()),
                                      "missed", phase=phase, operator=op,
                                      detail=f"no confirmation after {drill.escalation_rounds} "
                                             "escalation round(s)")
        return "missed"
    if first_run:
        svc.store.log(drill, "escalation_round", phase=phase, round=round_, operators=frozen)
    sends: list[Callable[[], object]] = [partial(_page, svc, drill, phase, op, round_)
                                         for op in pending]
    if drill.escalation:  # the frozen list: a re-run must send the very same event
        sends.append(partial(_send, svc, drill, phase, ESCALATION, round_=round_,
                             step="escalation_recipients",
                             event=_escalation_event(drill, phase, round_, frozen)))
    _send_all(sends)
    svc.schedule(drill, phase, round_ + 1, started + deadline * (round_ + 1))
    return "escalated"


def _confirmed(svc: DrillService, drill: Drill, phase: int) -> set[str]:
    state = svc.store.state(drill.id)
    return {op for op in drill.operators if op_field(phase, op, "confirmed_at") in state}


def _frozen_pending(svc: DrillService, drill: Drill, phase: int,
                    round_: int) -> tuple[list[str], bool]:
    """Operators without a confirmation as the first run of this round saw them, and whether
    this is that first run."""
    confirmed = _confirmed(svc, drill, phase)
    name = f"p{phase}:r{round_}"
    first = svc.store.set_once(drill.id, name,
                               json.dumps([op for op in drill.operators if op not in confirmed]))
    frozen: list[str] = json.loads(svc.store.field(drill.id, name) or "[]")
    return frozen, first


def _code(svc: DrillService, drill: Drill, phase: int, op: str, *, resend: bool) -> str:
    """The operator's code for this phase. A reminder (`resend`) keeps it valid for another
    reply_code_ttl: an operator expects the code in the SMS they just got to work, whatever
    the lifetime and the escalation schedule (and the phase must still be live anyway)."""
    field = op_field(phase, op, "code")
    existing = svc.store.field(drill.id, field)
    if existing and (not resend or svc.codes.renew(existing, drill.id, phase, op,
                                                   ttl=drill.reply_code_ttl)):
        return existing
    recipient = svc.settings.recipients.get(op)
    phone = recipient.phone if recipient is not None and recipient.phone else ""
    code = svc.codes.issue(drill.id, phase, op, phone=phone, ttl=drill.reply_code_ttl)
    if existing:  # ours expired and was issued to someone else since: this one replaces it
        svc.store.set(drill.id, **{field: code})
    elif not svc.store.set_once(drill.id, field, code):
        # Lost a race with another run: use the winner's (ours stays harmless: it names the
        # same drill, phase and operator, and expires).
        code = svc.store.field(drill.id, field) or code
    return code


def _operator_event(svc: DrillService, drill: Drill, phase: int, op: str, round_: int) -> Event:
    channels: Sequence[str] = ("sms",)
    if round_ > 0:  # escalation: the SMS again, and every other channel that reaches them
        recipient = svc.settings.recipients.get(op)
        others = [c for c in svc.settings.channels
                  if c != "sms" and recipient is not None and addresses(recipient, c)]
        channels = ("sms", *others)
    p = drill.phases[phase]
    return Event(
        kind="drill", title=f"{drill.name}: {p.name}",
        body="" if round_ == 0 else f"reminder {round_}",
        severity=drill.severity, labels={"drill_id": drill.id, "drill_phase": p.name},
        to=(op,), channels=tuple(channels),
        extra={"reply_code": _code(svc, drill, phase, op, resend=round_ > 0),
               "drill_id": drill.id,
               "phase": p.name, "drill_name": drill.name},
    )


def _escalation_event(drill: Drill, phase: int, round_: int, pending: list[str]) -> Event:
    p = drill.phases[phase]
    return Event(
        kind="alert", severity=drill.severity,
        title=f"Drill {drill.name}: {p.name} not confirmed",
        body=(f"No confirmation from {', '.join(pending)} within "
              f"{human_duration(p.deadline * round_)} of the phase start "
              f"(escalation round {round_}/{drill.escalation_rounds})."),
        labels={"drill_id": drill.id, "drill_phase": p.name},
        to=drill.escalation,
    )


def _page(svc: DrillService, drill: Drill, phase: int, op: str, round_: int) -> str | None:
    """The operator's SMS of this round: the announcement, or an escalation reminder."""
    return _send(svc, drill, phase, op, round_=round_, step=drill.step_name(round_),
                 event=_operator_event(svc, drill, phase, op, round_))


def _send(svc: DrillService, drill: Drill, phase: int, who: str, *, round_: int, step: str,
          event: Event) -> str | None:
    key = f"{TIMER_PREFIX}:{drill.id}:{phase}:{who}:{step}:{round_}"
    try:
        # The key holds as long as the transaction it names (`retention`, not the day of
        # idempotency_ttl): a step may run again long after this send (a retry, the scheduler
        # back after an outage) and must find it, not page again. Not longer: a replay counts
        # onto the transaction, which must still exist.
        txid = svc.intake.submit(event, Source.DRILL, idempotency_key=key,
                                 idempotency_ttl=svc.store.retention).transaction_id
    except IdempotencyConflict as exc:
        # The key is this very send's: a run before this one sent it, with what the config
        # said then (a deploy since changed the operator's channels). It went out: keep it.
        txid = exc.transaction_id
    except InvalidEvent as exc:  # e.g. the operator was removed from the config since
        svc.store.log(drill, "send_failed", phase=phase, operator=who, round=round_, step=step,
                      detail=str(exc))
        return None
    entry = {"at": time.time(), "phase": phase, "operator": who, "round": round_, "step": step,
             "to": list(event.to), "channels": list(event.channels), "transaction_id": txid}
    who_ = {"to": list(event.to)} if who == ESCALATION else {"operator": who}
    svc.store.set_once_logged(drill, op_field(phase, who, f"tx:{step}:{round_}"), txid, step,
                              send=entry, phase=phase, round=round_, **who_,
                              channels=list(event.channels) or ["(route)"], transaction_id=txid)
    return txid
