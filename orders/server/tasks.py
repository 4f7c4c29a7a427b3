"""Background tasks of the services."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_until_ended(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` until it has really ended. On Python 3.11 a single cancel can be swallowed
    inside redis-py (asyncio.wait_for, CPython gh-86296), which would hang shutdown for ever."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
