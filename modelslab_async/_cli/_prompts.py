"""
Prompts from the arguments and the prompts file, as checked requests.
"""

from __future__ import annotations

import argparse
import json

from pathlib import Path
from typing import Any

from modelslab_async._requests import FluxKleinText2Img, JobRequest, Text2Img
from modelslab_async.errors import InvalidRequestError

from ._common import UsageError


__all__ = ["read_requests", "request_class"]

#: Request fields set by options, with the flag that sets each.
_FLAGS = {
    "samples": "--samples",
    "width": "--width",
    "height": "--height",
    "seed": "--seed",
    "negative_prompt": "--negative-prompt",
    "base64": "--base64",
    "model_id": "--model-id",
}


def request_class(endpoint: str) -> type[JobRequest]:
    """
    The request class of an ``--endpoint``.
    """
    return Text2Img if endpoint == "v6" else FluxKleinText2Img


def read_requests(args: argparse.Namespace) -> list[JobRequest]:
    """
    Every prompt as a checked request, in order: the arguments', then the
    file's.

    Raises:
        UsageError: A bad option value, an unreadable or empty file, a bad
            line; nothing has been sent.
    """
    cls = request_class(args.endpoint)
    defaults = {
        name: value
        for name, value in ((name, getattr(args, name)) for name in _FLAGS)
        if value not in (None, False)
    }
    _check_options(cls, defaults)
    lines: list[tuple[str, dict[str, Any]]] = [
        ("argument", {"prompt": p}) for p in args.prompts
    ]
    if args.file is not None:
        from_file = _prompt_file(args.file)
        if not from_file:
            msg = (
                f"{args.file} has no prompts (blank lines and lines "
                "starting with # are skipped)"
            )
            raise UsageError(msg)
        lines += from_file
    if not lines:
        msg = "give at least one PROMPT or --file FILE"
        raise UsageError(msg)
    requests = []
    for where, fields in lines:
        try:
            requests.append(cls(**{**defaults, **fields}))
        except InvalidRequestError as exc:
            msg = f"{where}: {exc}"
            raise UsageError(msg) from None
        except TypeError as exc:
            unknown = str(exc).rsplit(" ", 1)[-1]
            msg = f"{where}: {cls.__name__} has no field {unknown}"
            raise UsageError(msg) from None
    return requests


def _check_options(cls: type[JobRequest], defaults: dict[str, Any]) -> None:
    """
    Check the options once, so a bad one is named by its flag.
    """
    for name, value in defaults.items():
        try:
            cls(prompt="-", **{name: value})  # type: ignore[call-arg]
        except InvalidRequestError as exc:
            msg = f"argument {_FLAGS[name]}: {value!r} is invalid: {exc.limit}"
            raise UsageError(msg) from None
        except TypeError:
            msg = (
                f"argument {_FLAGS[name]}: not an option of --endpoint "
                f"{cls.route.family}"
            )
            raise UsageError(msg) from None


def _prompt_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        msg = f"--file {path}: is a folder, not a prompts file"
        raise UsageError(msg) from None
    except OSError as exc:
        msg = f"--file {path}: cannot read it: {exc.strerror or exc}"
        raise UsageError(msg) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        msg = (
            f"--file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} "
            f"on line {line}); save it as UTF-8"
        )
        raise UsageError(msg) from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{number}"
        if not stripped.startswith("{"):
            lines.append((where, {"prompt": stripped}))
            continue
        try:
            fields = json.loads(stripped)
        except json.JSONDecodeError as exc:
            msg = f"{where}: not valid JSON ({exc.msg})"
            raise UsageError(msg) from None
        if not isinstance(fields, dict) or "prompt" not in fields:
            msg = f'{where}: a JSON line needs a "prompt"'
            raise UsageError(msg)
        lines.append((where, fields))
    return lines
