"""asyncio helpers that behave the same on Python 3.11 as on later versions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await `awaitable`; TimeoutError after `timeout` seconds.

    Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives as
    the awaited thing completes (CPython gh-86296, fixed in 3.12 by rewriting it on
    `asyncio.timeout`). A cancelled build's pending guard went back to waiting on a
    queue that never filled again, and the build waited for it forever.
    """
    async with asyncio.timeout(timeout):
        return await awaitable
