"""The outage gate and the outage log on their own, with a clock the test moves: who may call, when the next
probe is due, what is logged (the behaviour end to end against the simulator is in test_diagnosis.py and
test_gateway_rooms.py)."""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from gateway.errors import AccountLocked, AuthError, ImpersonationDenied, Throttled, Unreachable
from gateway.sources.outage import OutageGate
from gateway.sync.coordinator import OutageLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def down() -> Unreachable:
    return Unreachable("cannot connect to mail:443: the connection was refused", host="mail:443")


def test_the_first_call_goes_alone_and_the_others_learn_its_answer():
    gate = OutageGate()
    assert gate.admit() is True  # the first call is the probe
    answers: list[object] = []

    def second() -> None:
        try:
            answers.append(gate.admit())
        except AuthError as e:
            answers.append(e)
    t = threading.Thread(target=second)
    t.start()
    t.join(0.2)
    assert t.is_alive() and answers == []  # waiting for the probe's answer, no request of its own
    refused = AuthError("Exchange refused the service account's credentials")
    gate.record(True, refused)
    t.join(5)
    held = answers[0]
    assert isinstance(held, AuthError) and held is not refused and held.key == "invalid_auth"
    assert str(held) == str(refused) and getattr(held, "held", False)


def test_a_room_of_its_own_ends_nothing_and_an_answer_ends_the_outage():
    gate = OutageGate()
    probe = gate.admit()
    gate.record(probe, ImpersonationDenied("room7"))  # Exchange answered: the account works
    assert gate.failure is None and gate.admit() is False


def test_an_answer_to_a_call_let_through_before_the_outage_began_does_not_end_it():
    clock = Clock()
    gate = OutageGate(retry_seconds=5, clock=clock)
    heard: list[object] = []
    gate.listeners.append(heard.append)
    gate.record(gate.admit(), None)  # settled: calls go out side by side
    since = gate.outages
    assert gate.admit() is False  # a call goes out while Exchange is there ...
    gate.record(gate.admit(), down(), gate.outages)  # ... another, sent later, finds it gone ...
    gate.record(False, None, since)  # ... and the first one's answer is heard after that
    assert gate.failure is not None and [type(h) for h in heard] == [Unreachable]
    clock.now += 5
    since = gate.outages
    probe = gate.admit()
    assert probe is True
    gate.record(probe, None, since)  # the probe's answer ends it
    assert gate.failure is None and heard[-1] is None


def test_probes_are_spaced_by_a_doubling_back_off_and_refused_credentials_wait_longest():
    clock = Clock()
    gate = OutageGate(retry_seconds=5, max_retry_seconds=20, auth_retry_seconds=300, auth_max_retry_seconds=900,
                      clock=clock)
    gate.record(gate.admit(), down())
    waits = []
    for _ in range(4):
        with pytest.raises(Unreachable):
            gate.admit()  # held: no request leaves
        waits.append(gate.retry_at - clock.now)
        clock.now = gate.retry_at
        assert gate.admit() is True  # the one probe
        with pytest.raises(Unreachable):
            gate.admit()  # while it is out, nobody else
        gate.record(True, down())
    assert waits == [5, 10, 20, 20]

    gate.record(False, None)
    gate.record(gate.admit(), AuthError("refused"))
    auth_waits = []
    for _ in range(3):
        auth_waits.append(gate.retry_at - clock.now)
        clock.now = gate.retry_at
        gate.record(gate.admit(), AuthError("refused"))
    assert auth_waits == [300, 600, 900]
    gate.retry_now()  # new credentials: the next call probes at once
    assert gate.admit() is True


def test_throttling_holds_nobody():
    gate = OutageGate()
    gate.record(gate.admit(), Throttled("busy", back_off=2.0))
    assert gate.admit() is False  # not held: the source waits out BackOffMilliseconds itself
    assert gate.retry_at - gate.clock() == pytest.approx(2.0, abs=0.5)


def test_the_gate_tells_its_listeners_when_an_outage_starts_and_ends_not_on_every_failure():
    gate = OutageGate(retry_seconds=0)
    heard: list[object] = []
    gate.listeners.append(heard.append)
    first = down()
    gate.record(gate.admit(), first)
    gate.record(gate.admit(), down())
    gate.record(gate.admit(), None)
    assert heard == [first, None]


# -- the log (sync/coordinator.py): what an operator reads ---------------------------------------------------------
def test_an_outage_is_logged_when_it_starts_reminded_at_a_low_rate_and_when_it_ends():
    clock = Clock()
    outage = OutageLog(remind_seconds=300, quiet_seconds=10, clock=clock)
    with capture_logs() as logs:
        for _ in range(900):  # 15 minutes of rooms failing every second
            outage.failed(down())
            clock.now += 1
        outage.answered()
        outage.answered()
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("exchange.outage_started", "warning")] + [("exchange.outage_continues", "warning")] * 2 + [
        ("exchange.outage_ended", "info")]
    assert logs[0]["key"] == "cannot_connect" and "mail:443" in logs[0]["reason"] and "check" in logs[0]["remedy"]
    assert logs[-1]["seconds"] == 900


def test_a_held_copy_heard_after_the_outage_ended_is_over_and_one_held_in_a_new_outage_is_not():
    clock = Clock()
    gate = OutageGate(retry_seconds=5, clock=clock)
    outage = OutageLog(remind_seconds=300, quiet_seconds=10)
    gate.record(gate.admit(), down())
    outage.failed(down())
    with pytest.raises(Unreachable) as late:  # a room's call held back while the outage lasts ...
        gate.admit()
    assert not outage.is_over(late.value)
    clock.now += 5
    gate.record(gate.admit(), None)  # ... and the probe that ends it, heard first
    outage.answered()
    assert outage.is_over(late.value)
    assert not outage.is_over(down())  # a failure of a call of its own is never a held copy
    gate.record(gate.admit(), down())  # a new outage: its held copies are news
    with pytest.raises(Unreachable) as fresh:
        gate.admit()
    assert not outage.is_over(fresh.value)


def test_refused_credentials_are_an_error_and_their_recovery_is_named_so():
    outage = OutageLog(remind_seconds=300, quiet_seconds=10)
    with capture_logs() as logs:
        outage.failed(AuthError("Exchange refused the service account's credentials"))
        outage.answered()
    assert [(e["event"], e["log_level"]) for e in logs] == [("exchange.auth_failed", "error"),
                                                          ("exchange.auth_restored", "info")]


def test_throttling_that_lets_some_requests_through_is_one_episode():
    clock = Clock()
    outage = OutageLog(remind_seconds=300, quiet_seconds=10, clock=clock)
    with capture_logs() as logs:
        for _ in range(20):  # a request refused, one passed, for a minute
            outage.failed(Throttled("busy", back_off=2.0))
            clock.now += 1.5
            outage.answered()
            clock.now += 1.5
        clock.now += 10
        outage.answered()
    assert [e["event"] for e in logs] == ["exchange.outage_started", "exchange.outage_ended"]


def test_a_locked_account_costs_one_probe_at_the_long_back_off_like_refused_credentials():
    # Every room of a locked-out account would fail alike; one request per room would only add to the lockout.
    clock = Clock()
    gate = OutageGate(auth_retry_seconds=300, auth_max_retry_seconds=900, clock=clock)
    gate.record(gate.admit(), AccountLocked("Exchange says the service account is locked out"))
    with pytest.raises(AccountLocked):
        gate.admit()  # held: no request leaves
    assert gate.retry_at - clock.now == 300


def test_a_lockout_the_directory_reports_holds_every_call_until_it_says_unlocked_or_the_back_off_ends():
    clock = Clock()
    gate = OutageGate(auth_retry_seconds=300, auth_max_retry_seconds=900, clock=clock)
    heard: list[object] = []
    gate.listeners.append(heard.append)
    locked = AccountLocked("Active Directory says the service account is locked out")
    gate.hold(locked)  # before any call: the very first one is held too, no logon at all
    with pytest.raises(AccountLocked):
        gate.admit()
    assert heard == [locked] and gate.retry_at - clock.now == 300
    gate.hold(AccountLocked("still locked"))  # the next check says so again: nothing new, no longer wait
    assert len(heard) == 1 and gate.retry_at - clock.now == 300
    gate.release()  # the directory says unlocked: the next call probes at once
    assert gate.admit() is True
    gate.record(True, None)
    assert gate.failure is None and heard == [locked, None]

    gate.hold(locked)
    clock.now = gate.retry_at  # or, without word from the directory, after the auth back-off
    assert gate.admit() is True


def test_release_lets_only_a_lockout_probe_early():
    clock = Clock()
    gate = OutageGate(auth_retry_seconds=300, clock=clock)
    gate.record(gate.admit(), AuthError("refused"))  # a wrong password is not the directory's to lift
    gate.release()
    with pytest.raises(AuthError):
        gate.admit()
