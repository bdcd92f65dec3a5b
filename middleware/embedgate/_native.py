"""The modules the build compiles with mypyc, and the guard that keeps a stale compiled build from running.

``pip install`` compiles :data:`COMPILED` to C extensions (``setup.py``; ``EMBEDGATE_PURE_PYTHON=1`` at install
time skips it) and writes :data:`STAMP`, the digest of the sources it compiled. At import, :func:`guard` compares
that digest with the sources as they are now: in an editable install whose sources were changed since (a git
checkout, an edit), the extensions would run the old code, so the sources run instead, all of them (the compiled
modules share one native library: never half of each), and a warning says to reinstall.
``EMBEDGATE_PURE_PYTHON=1`` at run time runs the sources too.

Of the modules with ``async def``, all but the cache are compiled: the gateway's ASGI entry, the pipeline, the router,
the budgets (engine and stores) and their Redis client, the identity stores, and of ``providers/`` the upstream
adapter, its transport and the deadline (not the proxy routing, used only when a proxy is set). With mypyc 2.4.1,
an ``await`` inside an ``except`` or ``finally`` block of a compiled coroutine lost track of the exception
being handled: the router's split batches crashed the process, and the gateway let a timeout's cancellation surface
after the error answer had been sent. Their cleanup now runs after the handler, and ``tests/test_native.py`` keeps
such awaits out of every compiled module. The cache extends aiocache's ``BaseCache``, which a compiled class cannot,
and stays interpreted; its keys (``cache_keys``, one per item of a batch) are compiled. A compiled class takes no
interpreted subclass unless marked so (``EmbeddingGateway`` and the router's ``AttemptHook`` are); wrap one instead
(as ``tests/test_budgets_engine.py``'s counting store does).

Standard library only: ``setup.py`` loads this file before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED", "LIBRARY", "STAMP", "guard", "source_digest", "stamp_build"]

#: Modules of the ``embedgate`` package compiled by the build (code on every request's path, and the span export
#: helper's encoder), as paths under the package without ``.py``: ``providers/http1`` is ``embedgate.providers.http1``.
COMPILED = (
    "budget_stores", "budgets", "cache_keys", "current_span", "gateway", "identities", "lean_trace", "logs", "metrics",
    "observe", "otlp_encode", "outcome", "pipeline", "request", "resp", "routing", "serve_protocol", "telemetry",
    "vectors", "wire",
    "providers/deadline", "providers/http1", "providers/openai",
)  # fmt: skip
#: The file beside them holding the digest of the sources the build compiled.
STAMP = "_native_stamp.txt"
#: The native library the compiled modules share, beside the package (mypycify's ``group_name``).
LIBRARY = "embedgate__mypyc"

_HERE = Path(__file__).resolve().parent


def source_digest(package_dir: Path = _HERE) -> str:
    """sha256 over the sources of :data:`COMPILED`, in order."""
    digest = hashlib.sha256()
    for name in COMPILED:
        digest.update(name.encode() + b"\0")
        digest.update((package_dir / f"{name}.py").read_bytes())
    return digest.hexdigest()


def stamp_build(package_dir: Path, digest: str, *, failed: bool) -> str | None:
    """Once the build compiled the extensions: write :data:`STAMP` when it compiled all of them from sources
    that still have ``digest`` (read before mypyc read them); else leave none (the build then counts as stale)
    and return why. The build removes the stamp before it compiles: written as mypyc generated the C, it said the
    library on disk matched the sources while the C compiler still built the new one (and after a failed compile,
    for good)."""
    stamp = package_dir / STAMP
    if failed:
        stamp.unlink(missing_ok=True)
        return "a part of the build failed to compile"
    if source_digest(package_dir) != digest:
        stamp.unlink(missing_ok=True)
        return "the sources changed while they compiled"
    stamp.write_text(digest + "\n")
    return None


def _has_extension(directory: Path, name: str) -> bool:
    return any((directory / f"{name}{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def guard(package_dir: Path = _HERE) -> str:
    """How ``embedgate`` runs: ``"compiled"``, ``"source"`` (no build, or asked for) or ``"stale"``.

    For ``"stale"``, and ``"source"`` while extensions are present, the sources are made to load instead."""
    built = [name for name in COMPILED if _has_extension(package_dir, name)]
    if not built:
        return "source"
    if os.environ.get("EMBEDGATE_PURE_PYTHON", "") not in ("", "0"):
        _prefer_sources(package_dir)
        return "source"
    stamp = package_dir / STAMP
    try:
        recorded = stamp.read_text().strip()
    except OSError:
        recorded = ""
    whole = len(built) == len(COMPILED) and _has_extension(package_dir.parent, LIBRARY)
    if whole and recorded == source_digest(package_dir):
        return "compiled"
    _prefer_sources(package_dir)
    logging.getLogger("embedgate").warning(
        "embedgate: the compiled modules do not match their sources (changed since the install, or a part of the "
        "build failed); running the sources. Reinstall (pip install -e .) to compile them again."
    )
    return "stale"


class _SourceFinder:
    """Finds the compiled modules' ``.py`` files, ahead of their extensions."""

    def __init__(self, package_dir: Path) -> None:
        self._dir = package_dir

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        package, _, rest = fullname.partition(".")
        name = rest.replace(".", "/")
        if package != "embedgate" or name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(fullname, self._dir / f"{name}.py")


def _prefer_sources(package_dir: Path) -> None:
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(package_dir))
