"""orders.server.tasks.BackgroundTask: the start/stop of every service's background loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orders.server.tasks import BackgroundTask


async def forever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.Event().wait()


async def test_start_runs_the_work_under_its_name_and_stop_ends_it() -> None:
    """The task carries the helper's name while it runs; stop returns once it has ended."""
    started = asyncio.Event()
    task = BackgroundTask("probe-test")

    task.start(lambda: forever(started))
    await started.wait()
    names = {t.get_name() for t in asyncio.all_tasks()}
    await task.stop()

    assert "probe-test" in names
    assert not task.running
    assert "probe-test" not in {t.get_name() for t in asyncio.all_tasks()}


async def test_stop_twice_and_stop_before_start_are_harmless() -> None:
    never_started = BackgroundTask("never")
    await never_started.stop()

    started = asyncio.Event()
    task = BackgroundTask("twice")
    task.start(lambda: forever(started))
    await started.wait()
    await task.stop()
    await task.stop()

    assert not never_started.running
    assert not task.running


async def test_a_cancel_swallowed_once_does_not_hang_the_stop() -> None:
    """As redis-py can on Python 3.11 (CPython gh-86296): the first cancel is lost, the stop goes on."""
    swallowed = asyncio.Event()
    started = asyncio.Event()

    async def stubborn() -> None:
        try:
            await forever(started)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()

    task = BackgroundTask("stubborn")
    task.start(stubborn)
    await started.wait()
    await task.stop()

    assert swallowed.is_set()
    assert not task.running


async def test_a_task_that_ends_by_itself_stops_quietly(caplog: pytest.LogCaptureFixture) -> None:
    finished = asyncio.Event()

    async def short() -> None:
        finished.set()

    task = BackgroundTask("short")
    task.start(short)
    await finished.wait()
    await asyncio.sleep(0)  # let the task complete and its done callback run
    await task.stop()

    assert not task.running
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failing_task_is_logged_with_its_name_and_stop_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The exception is not lost until garbage collection: it is logged when the task fails."""

    async def failing() -> None:
        raise ValueError("broken watcher")

    task = BackgroundTask("failing")
    with caplog.at_level(logging.ERROR, logger="orders.server.tasks"):
        task.start(failing)
        for _ in range(3):
            await asyncio.sleep(0)
        await task.stop()

    [record] = [r for r in caplog.records if r.name == "orders.server.tasks"]
    assert record.levelno == logging.ERROR
    assert "'failing'" in record.getMessage()
    assert "ValueError: broken watcher" in record.getMessage()
    assert record.exc_info is not None


async def test_start_refuses_a_second_copy_but_restarts_after_a_stop() -> None:
    started = asyncio.Event()
    task = BackgroundTask("once")
    task.start(lambda: forever(started))
    await started.wait()

    with pytest.raises(RuntimeError, match="already running"):
        task.start(lambda: forever(asyncio.Event()))
    await task.stop()
    restarted = asyncio.Event()
    task.start(lambda: forever(restarted))
    await restarted.wait()
    await task.stop()

    assert not task.running
