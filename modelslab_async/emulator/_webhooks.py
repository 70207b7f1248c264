"""
The webhook sender: a POST back to the caller when a job ends, the way the
service sends them (best effort, maybe twice, maybe never).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import attrs


__all__ = ["Delivery", "WebhookSender", "is_loopback"]

log = logging.getLogger("modelslab_async.emulator")

#: The documented limit for a receiver to answer ("within 30 seconds").
_TIMEOUT = aiohttp.ClientTimeout(total=30)


@attrs.frozen(kw_only=True)
class Delivery:
    """
    One job's webhook: where, how many copies, and what to say.

    Args:
        job_id: The job, for the hooks and the log.
        url: The receiver.
        copies: 1, or 2 for a duplicate.
        delay: Seconds until it is sent: the job's time left, plus any
            delay asked for.
        payload: Makes the payload when it is time to send, from the job's
            state then.
        on_sent: Called with the job id just before each POST leaves.
        on_answer: Called with the payload and the HTTP status after each
            POST (0 when the receiver could not be reached).
    """

    job_id: str
    url: str
    copies: int
    delay: float
    payload: Callable[[], dict[str, Any]]
    on_sent: Callable[[str], object] | None
    on_answer: Callable[[dict[str, Any], int], None]


@attrs.define(eq=False)
class WebhookSender:
    """
    Sends webhooks on a session of its own, each in a task it keeps.
    """

    _session: aiohttp.ClientSession | None = attrs.field(
        init=False, default=None
    )
    _tasks: set[asyncio.Task[None]] = attrs.field(init=False, factory=set)

    def start(self) -> None:
        """
        Open the session; call in the running loop.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)

    async def aclose(self) -> None:
        """
        Cancel the webhooks not yet sent, and close the session.
        """
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def schedule(self, delivery: Delivery) -> None:
        """
        Send *delivery* after its delay, unless closed first.
        """
        if self._session is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, delivery: Delivery) -> None:
        await asyncio.sleep(delivery.delay)
        payload = delivery.payload()
        for _ in range(delivery.copies):
            if delivery.on_sent is not None:
                delivery.on_sent(delivery.job_id)
            status = await self.post(delivery.url, payload, delivery.job_id)
            delivery.on_answer(payload, status)

    async def post(
        self, url: str, payload: dict[str, Any], job_id: str
    ) -> int:
        """
        POST *payload* to *url*; the HTTP status, or 0 if unreachable.
        """
        if self._session is None:
            return 0
        try:
            async with self._session.post(url, json=payload) as response:
                await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Best effort, as the service's: a receiver that is gone is
            # the receiver's business, worth a line when debugging only.
            log.debug(
                "webhook for job %s to %s not delivered: %s: %s",
                job_id,
                url,
                type(exc).__name__,
                exc,
            )
            return 0
        return response.status


def is_loopback(url: str) -> bool:
    """
    Whether *url* is on this machine, the only place webhooks go.
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
