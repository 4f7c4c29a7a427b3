"""The batch window of a projection's tail loop: under steady load, a short wait for more events.

Every step costs the same fixed work whatever its batch holds: waking up, a read of the log and
two Redis round trips. A loop that steps on each notification of a steady few hundred appends per
second applies batches of about one event, so that fixed work is most of its CPU. Like Nagle's
algorithm or PostgreSQL's commit_delay, a busy loop therefore waits a short, bounded time
(ORDERS_BATCH_WAIT) after the first notification no step has started on, so that its batch also
holds the events notified meanwhile. A loop that is not busy steps at once: a lone event is never
delayed. Whether the loop is busy is measured, not assumed. It is busy when stepping once per
notification would keep it stepping at least BUSY_SHARE of the time: judged on the moving average
of the time between notifications (two appends in a row do not make a quiet loop busy) and on the
latest gap (the first notification after a quiet spell goes at once, whatever the average remembers).
A notification may stand for one event or for a batch of appends: the window only counts time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_WAIT = 0.002  # seconds: at 500 events/s about two more events per batch, a small share of the lag
ALPHA = 0.2  # weight of the newest sample in the moving averages: about the last ten count
# Busy: a step of one notification's events takes at least this share of the time between
# notifications. Below it, stepping on each one leaves the loop mostly idle, and waiting would add
# lag for little saved.
BUSY_SHARE = 0.25


class BatchWindow:
    """When one projection loop steps: at once, or up to `wait` seconds after the first notification
    it has not stepped on yet. `clock` is the monotonic clock in seconds (a fake one in unit tests)."""

    def __init__(self, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait = wait
        self._clock = clock
        self._interval = math.inf  # moving average of the seconds between notifications
        self._gap = math.inf  # seconds between the latest notification and the one before
        self._step = 0.0  # moving average of the seconds a step with events takes; 0: none yet
        self._last_notified: float | None = None
        self._pending_since: float | None = None  # the first notification no step has started on
        self.waits = 0  # steps that waited for more events
        self.immediate = 0  # steps on a notification that did not wait

    def notified(self) -> None:
        """A notification of an append arrived."""
        now = self._clock()
        if self._last_notified is not None:
            self._gap = now - self._last_notified
            self._interval = _average(self._interval, self._gap)
        self._last_notified = now
        if self._pending_since is None:
            self._pending_since = now

    @property
    def last_notified(self) -> float:
        """When the latest notification arrived; -inf before the first."""
        return -math.inf if self._last_notified is None else self._last_notified

    @property
    def busy(self) -> bool:
        """Notifications come so close together that stepping on each would keep the loop stepping
        BUSY_SHARE of the time or more, on average and at the latest one."""
        close = self._step / BUSY_SHARE
        return self._interval < close and self._gap < close

    def delay(self) -> float:
        """Seconds to wait before the next step: what is left of `wait` since the first notification
        no step has started on, while busy; else 0. Counts the step as one that waited or not."""
        if self._pending_since is None:
            return 0.0  # a poll, or a step right after the last: nothing notified to wait for
        if self.wait <= 0 or not self.busy:
            self.immediate += 1
            return 0.0
        self.waits += 1
        return max(0.0, self._pending_since + self.wait - self._clock())

    def stepping(self) -> float:
        """A step starts: it reads what every notification so far announced. Returns its start."""
        self._pending_since = None
        return self._clock()

    def stepped(self, started: float) -> None:
        """A step that applied events, started at `started`, ended: it measures what a step costs."""
        self._step = _average(self._step or math.inf, self._clock() - started)


def _average(average: float, sample: float) -> float:
    """The moving average with `sample`; the first sample (`average` infinite) stands alone."""
    return sample if math.isinf(average) else average + ALPHA * (sample - average)
