"""
The package's public face: exports, version, typing marker.
"""

from __future__ import annotations
import __future__

import importlib.metadata
import inspect
import re
import tomllib

from pathlib import Path

import pytest

import modelslab_async
import modelslab_async.emulator
import modelslab_async.errors
import modelslab_async.stores
import modelslab_async.webhooks


def test_package_all_is_exactly_its_namespace():
    """The package exports every public name it has, sorted."""
    public = {
        name
        for name in dir(modelslab_async)
        if not name.startswith("_")
        and not inspect.ismodule(getattr(modelslab_async, name))
        and getattr(modelslab_async, name) is not __future__.annotations
    }

    assert modelslab_async.__all__ == sorted(modelslab_async.__all__)
    assert set(modelslab_async.__all__) == public | {"errors", "stores"}


@pytest.mark.parametrize(
    "module",
    [
        modelslab_async.errors,
        modelslab_async.webhooks,
        modelslab_async.emulator,
        modelslab_async.stores,
    ],
)
def test_public_modules_export_what_they_define(module):
    """Every public class and function a public module defines is exported."""
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__.startswith(module.__name__)
    }

    assert module.__all__ == sorted(module.__all__)
    assert defined <= set(module.__all__)
    assert all(hasattr(module, name) for name in module.__all__)


def test_every_export_is_documented():
    """Each exported name has a docstring of its own."""
    for name in modelslab_async.__all__:
        value = getattr(modelslab_async, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def test_version_matches_the_metadata():
    """__version__ is the installed distribution's version."""
    assert modelslab_async.__version__ == importlib.metadata.version(
        "modelslab-async"
    )
    with pytest.raises(AttributeError):
        modelslab_async.no_such_name  # noqa: B018


def test_typed_marker_ships():
    """py.typed is in the package, so type checkers read our hints."""
    assert (Path(modelslab_async.__file__).parent / "py.typed").is_file()


def test_no_module_uses_another_modules_private_names():
    """ruff's SLF001 is on, and each exemption stays inside its own module."""
    config = tomllib.loads(
        (Path(__file__).parent.parent / "pyproject.toml").read_text("utf-8")
    )["tool"]["ruff"]["lint"]
    package = Path(modelslab_async.__file__).parent
    assert "SLF001" not in config["ignore"]
    assert all(
        "SLF001" not in rules
        for where, rules in config.get("per-file-ignores", {}).items()
        if where.startswith("modelslab_async")
    )
    for source in package.rglob("*.py"):
        text = source.read_text("utf-8")
        for line in text.splitlines():
            if "noqa: SLF001" not in line:
                continue
            names = re.findall(r"\._([a-z]\w*)", line.split("#", 1)[0])
            # The private name must be one this very module defines.
            assert names, (source, line)
            for name in names:
                assert re.search(
                    rf"(self\._{name}\b|^\s*_{name}\s*[:=])",
                    text,
                    re.MULTILINE,
                ), (source, name)
