"""The batch window of a projection loop (sync_worker.batching), on a clock the tests move by hand."""

from __future__ import annotations

import math

import pytest

from sync_worker.batching import BatchWindow

STEP = 0.001  # seconds one step of the tests' loop takes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def a_step(window: BatchWindow, clock: Clock) -> None:
    """One step that applied events, taking STEP seconds."""
    started = window.stepping()
    clock.advance(STEP)
    window.stepped(started)


def steady(window: BatchWindow, clock: Clock, every: float, count: int = 20) -> None:
    """`count` notifications `every` seconds apart, each stepped on at once."""
    for _ in range(count):
        clock.advance(every)
        window.notified()
        a_step(window, clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_first_notification_is_stepped_on_at_once(clock: Clock) -> None:
    window = BatchWindow(3600.0, clock)
    window.notified()

    assert window.delay() == 0
    assert (window.waits, window.immediate) == (0, 1)


def test_notifications_faster_than_steps_wait_for_the_rest_of_the_window(clock: Clock) -> None:
    """Busy: notifications every 2 steps. The loop waits until `wait` after the first notification
    no step has started on, not `wait` from now."""
    window = BatchWindow(0.003, clock)
    steady(window, clock, every=2 * STEP)
    clock.advance(2 * STEP)
    window.notified()
    clock.advance(0.0005)  # the loop gets to it a little later

    assert window.delay() == pytest.approx(0.0025)
    assert window.waits == 1


def test_the_window_is_never_longer_than_the_wait(clock: Clock) -> None:
    window = BatchWindow(0.003, clock)
    steady(window, clock, every=2 * STEP)
    clock.advance(2 * STEP)
    window.notified()
    clock.advance(0.01)  # a long step went past the window already

    assert window.delay() == 0


def test_a_zero_wait_never_waits(clock: Clock) -> None:
    window = BatchWindow(0.0, clock)
    steady(window, clock, every=STEP / 2)
    window.notified()

    assert window.delay() == 0
    assert window.waits == 0


def test_sparse_notifications_are_stepped_on_at_once(clock: Clock) -> None:
    """Notifications every 10 steps: stepping on each keeps the loop busy a tenth of the time."""
    window = BatchWindow(3600.0, clock)
    steady(window, clock, every=10 * STEP)
    clock.advance(10 * STEP)
    window.notified()

    assert window.delay() == 0
    assert window.waits == 0


def test_the_first_notification_after_a_quiet_spell_goes_at_once(clock: Clock) -> None:
    """However busy the loop was, a lone event after a pause is not delayed, even by a huge wait."""
    window = BatchWindow(3600.0, clock)
    steady(window, clock, every=STEP / 2)
    clock.advance(1.0)
    window.notified()

    assert window.delay() == 0
    assert window.waits == 0


def test_two_notifications_in_a_row_do_not_make_a_quiet_loop_busy(clock: Clock) -> None:
    window = BatchWindow(3600.0, clock)
    steady(window, clock, every=1.0)
    clock.advance(1.0)
    window.notified()
    clock.advance(STEP / 10)
    window.notified()

    assert window.delay() == 0


def test_a_poll_without_notification_does_not_wait(clock: Clock) -> None:
    """A step started on the poll (or right after a full batch) read everything notified so far."""
    window = BatchWindow(3600.0, clock)
    steady(window, clock, every=STEP / 2)

    assert window.delay() == 0
    assert (window.waits, window.immediate) == (0, 0)


def test_last_notified_is_when_the_latest_notification_arrived(clock: Clock) -> None:
    window = BatchWindow(0.002, clock)
    assert window.last_notified == -math.inf
    window.notified()
    clock.advance(1.0)
    window.notified()

    assert window.last_notified == clock.now
