"""
Submit retries the batch waits out itself, so that once stopped it sends
nothing more.

The client retries a submit the server provably did not take (a 429 above
all, also a 503 or a connection that never opened) inside ``submit()``,
after a back-off of up to a minute, then sends it again. A batch stopped
meanwhile could only wait for that, or cancel the submit, which the
journal would keep as ``uncertain``: never sent again, though no job
exists.

So the client of ``generate`` gets :class:`HandBack`: for a submit sent
through :func:`send`, its back-off is "never", so the client raises that
answer's error at once and withdraws the journal's claim (nothing was
made). :func:`send` then waits the back-off the policy asks, on the gate,
and sends again, or, once the gate is closed, sends nothing: the prompt is
``pending``, as if its turn had not come.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs

from modelslab_async._retry import RetryPolicy
from modelslab_async.errors import ModelsLabError, RateLimitError

from ._gate import Gate, NotSentError


__all__ = ["HandBack", "send"]

_T = TypeVar("_T")

log = logging.getLogger("modelslab_async")


@attrs.define
class _Submit:
    """
    One try of a submit sent by :func:`send`, in its task.
    """

    task: asyncio.Task[Any] | None
    #: Whether the client wanted to retry it, and after what the server
    #: asked.
    handed_back: bool = False
    retry_after: float | None = None


_SENDING: contextvars.ContextVar[_Submit | None] = contextvars.ContextVar(
    "modelslab_async_cli_sending", default=None
)


@attrs.frozen(kw_only=True)
class HandBack(RetryPolicy):
    """
    The default retry policy, except that a submit sent by :func:`send`
    is never retried by the client: its retry is handed back to
    :func:`send`, whose wait the gate can end.

    Its *timeout* must not be ``None``: an endless back-off is how the
    client is told not to retry.
    """

    def __attrs_post_init__(self) -> None:
        if self.timeout is None:
            msg = "HandBack needs a timeout: an endless back-off is no retry"
            raise ValueError(msg)

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        sending = _SENDING.get()
        # The task too: a task the submit starts (its job's watcher)
        # inherits the context, and its fetches are the client's to retry.
        if sending is not None and sending.task is asyncio.current_task():
            sending.handed_back = True
            sending.retry_after = retry_after
            return math.inf
        return super().backoff(attempt, retry_after)


async def send(
    submit: Callable[[], Awaitable[_T]],
    *,
    policy: RetryPolicy,
    gate: Gate,
    what: str,
) -> _T:
    """
    ``await submit()``, retried as *policy* says when the client hands a
    retry back (see :class:`HandBack`), the wait between tries ended by
    the gate closing.

    Raises:
        NotSentError: The gate closed while a retry was waited for.
        ModelsLabError: As ``submit()``, once *policy* allows no retry.
    """
    started = time.monotonic()
    tries = failures = 0
    while True:
        tries += 1
        sending = _Submit(asyncio.current_task())
        token = _SENDING.set(sending)
        try:
            return await submit()
        except ModelsLabError as error:
            if not sending.handed_back:
                raise
            failed = error
        finally:
            _SENDING.reset(token)
        # As the client counts: a 429 is waited out, not a failed try.
        if not isinstance(failed, RateLimitError):
            failures += 1
        delay = policy.backoff(tries, sending.retry_after)
        if failures >= policy.attempts or (
            policy.timeout is not None
            and time.monotonic() + delay - started > policy.timeout
        ):
            raise failed
        log.info(
            "retrying %s in %.2fs after %s (try %d)",
            what,
            delay,
            type(failed).__name__,
            tries + 1,
        )
        with anyio.move_on_after(delay):
            await gate.wait()
        if gate.closed:
            msg = "the batch stopped before this job was sent again"
            raise NotSentError(msg) from failed
