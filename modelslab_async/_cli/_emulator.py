"""
``modelslab-async emulator``: serve the emulator until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import errno

from typing import Any

from modelslab_async._client import API_KEY_VARIABLE

from ._common import CommandError, Console, Exit, UsageError


__all__ = ["fault", "serve_emulator"]

_ROUTES = ("submit", "fetch", "download")


def fault(text: str) -> tuple[str, str, float]:
    """
    ``ROUTE:KIND:RATE`` of ``--fault``, checked.
    """
    from modelslab_async.emulator import FAULT_KINDS  # noqa: PLC0415

    route, _, rest = text.partition(":")
    kind, _, rate = rest.partition(":")
    try:
        probability = float(rate)
    except ValueError:
        probability = -1.0
    if (
        route not in _ROUTES
        or kind not in FAULT_KINDS
        or not 0 <= probability <= 1
    ):
        msg = (
            f"{text!r} is not ROUTE:KIND:RATE (route submit, fetch or "
            f"download; kind one of {', '.join(FAULT_KINDS)}; rate 0 to 1)"
        )
        raise argparse.ArgumentTypeError(msg)
    return route, kind, probability


async def serve_emulator(args: argparse.Namespace, console: Console) -> int:
    """
    Run ``emulator``; return the exit status when interrupted.
    """
    from modelslab_async.emulator import ALL_QUIRKS, Emulator, Faults  # noqa: PLC0415

    # Keys checked by fault(); Faults checks them again.
    rates: dict[Any, dict[Any, float]] = {}
    for route, kind, rate in args.fault:
        rates.setdefault(route, {})[kind] = rate
    try:
        emulator = Emulator(
            host=args.host,
            port=args.port,
            seed=args.seed,
            eta=args.eta,
            eta_error=args.eta_error,
            eta_bias=args.eta_bias,
            announce=args.announce,
            queue_limit=args.queue_limit,
            retry_after=args.retry_after,
            cdn_delay=args.cdn_delay,
            strict=args.strict,
            quirks=frozenset() if args.no_quirks else ALL_QUIRKS,
            base64_delivery=args.base64_delivery,
            record_limit=args.record_limit,
            job_ttl=args.job_ttl,
            faults=Faults(
                rates=rates,
                webhook_drop=args.webhook_drop,
                webhook_duplicate=args.webhook_duplicate,
                seed=args.seed,
            ),
        )
    except ImportError as exc:
        raise CommandError(str(exc), Exit.MISSING_EXTRA) from None
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        await emulator.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            msg = f"port {args.port} is in use; choose another with --port"
            raise UsageError(msg) from None
        msg = f"cannot serve on {args.host}:{args.port}: {exc.strerror}"
        raise UsageError(msg) from None
    try:
        # The URL comes first and alone, for scripts that start us.
        print(emulator.url, flush=True)
        console.info(
            f"emulating ModelsLab at {emulator.url}; try:\n"
            f"  {API_KEY_VARIABLE}=any modelslab-async generate "
            f'--base-url {emulator.url} "a lighthouse"'
        )
        await asyncio.Event().wait()  # until interrupted
    finally:
        await emulator.aclose()
    return Exit.OK
