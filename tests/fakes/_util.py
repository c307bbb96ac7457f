"""Small helpers shared by the fakes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(
    predicate: Callable[[], bool],
    timeout: float,  # noqa: ASYNC109 - a polling helper for tests
    interval: float = 0.01,
) -> None:
    """Polls ``predicate`` until it is true.

    Args:
        predicate: Condition to wait for.
        timeout: Seconds to wait.
        interval: Seconds between checks.

    Raises:
        TimeoutError: The condition did not hold in time.
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - state changes come from many places
            await asyncio.sleep(interval)
