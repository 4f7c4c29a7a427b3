"""Background tasks of the services: the loops that watch, probe and follow while a process runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def cancel_until_ended(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` until it has really ended. On Python 3.11 a single cancel can be swallowed
    inside redis-py (asyncio.wait_for, CPython gh-86296), which would hang shutdown for ever."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)


class BackgroundTask:
    """One named background task of a service object (a watcher, a probe, a feed).

    `start` runs a fresh coroutine from `work` as an asyncio task named `name` (so it shows in task
    dumps and log lines). `stop` cancels it until it has really ended (`cancel_until_ended`); it may
    be called before any start, twice, or after the task ended by itself, and never raises. A task
    that fails by itself has its exception logged at once with its name, instead of only when the
    task is garbage-collected ("Task exception was never retrieved").
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Runs `work()` in the background. Refuses to start a second copy: the first would run on unseen."""
        if self.running:
            raise RuntimeError(f"background task {self.name!r} is already running")
        self._task = asyncio.create_task(work(), name=self.name)
        self._task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        """Cancels the task and returns once it has ended."""
        await cancel_until_ended(self._task)


def _log_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("background task %r failed: %s: %s", task.get_name(), type(error).__name__, error, exc_info=error)
