"""The compiled build (mypyc, see setup.py) runs only when it matches the sources; CI runs it."""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import embedgate
from embedgate import _native

PACKAGE = Path(embedgate.__file__).parent


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A copy of the compiled modules' sources; the finder a guard installs is removed afterwards.

    The guard of this process is set aside meanwhile: when it runs the sources beside installed extensions
    (``EMBEDGATE_PURE_PYTHON=1``, or a stale build) its finder is on ``sys.meta_path``, and a guard installs none
    while one is there. The tests that use this fixture import nothing of the package meanwhile."""
    package = tmp_path / "embedgate"
    package.mkdir()
    for name in _native.COMPILED:
        (package / name).parent.mkdir(exist_ok=True)
        shutil.copy(PACKAGE / f"{name}.py", package / f"{name}.py")
    finders = list(sys.meta_path)
    sys.meta_path[:] = [f for f in finders if not isinstance(f, _native._SourceFinder)]
    yield package
    sys.meta_path[:] = finders


def build(package: Path) -> None:
    """What the build leaves: an extension per module, their shared library and the stamp of the sources."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in _native.COMPILED:
        (package / f"{name}{suffix}").write_bytes(b"")
    (package.parent / f"{_native.LIBRARY}{suffix}").write_bytes(b"")
    (package / _native.STAMP).write_text(_native.source_digest(package) + "\n")


def source_finders() -> list[object]:
    return [f for f in sys.meta_path if type(f).__name__ == "_SourceFinder"]


def test_without_extensions_the_sources_run(package: Path) -> None:
    assert _native.guard(package) == "source"
    assert source_finders() == []


def test_a_build_that_matches_its_sources_runs(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDGATE_PURE_PYTHON", raising=False)
    build(package)
    assert _native.guard(package) == "compiled"
    assert source_finders() == []


def test_a_source_changed_after_the_build_makes_every_module_load_from_source(
    package: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("EMBEDGATE_PURE_PYTHON", raising=False)
    build(package)
    with (package / "request.py").open("a") as f:
        f.write("\n# edited after the build\n")
    assert _native.guard(package) == "stale"
    assert "Reinstall" in caplog.text
    (finder,) = source_finders()
    for name in _native.COMPILED:  # all of them, not only the edited one: they share one native library
        spec = finder.find_spec("embedgate." + name.replace("/", "."), None)  # type: ignore[attr-defined]
        assert spec is not None and spec.origin == str(package / f"{name}.py")
    assert finder.find_spec("embedgate.config", None) is None  # type: ignore[attr-defined]


def test_a_build_without_its_stamp_is_not_trusted(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDGATE_PURE_PYTHON", raising=False)
    build(package)
    (package / _native.STAMP).unlink()  # what EMBEDGATE_PURE_PYTHON=1 at install leaves of an earlier build
    assert _native.guard(package) == "stale"


def test_a_build_whose_shared_library_failed_is_not_trusted(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDGATE_PURE_PYTHON", raising=False)
    build(package)
    (package.parent / f"{_native.LIBRARY}{importlib.machinery.EXTENSION_SUFFIXES[0]}").unlink()
    assert _native.guard(package) == "stale"  # the modules' stubs would fail to import without it


def test_the_build_is_stamped_only_once_every_extension_compiled(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stamp was written as mypyc generated the C: while the C compiler still built the new library (minutes),
    # and for good after a failed compile, the old library was taken for the sources on disk.
    monkeypatch.delenv("EMBEDGATE_PURE_PYTHON", raising=False)
    build(package)
    (package / _native.STAMP).unlink()  # as the build starts (setup.py's ext_modules)
    digest = _native.source_digest(package)
    assert _native.guard(package) == "stale"  # meanwhile
    assert _native.stamp_build(package, digest, failed=True) is not None
    assert _native.guard(package) == "stale"
    (package / "routing.py").write_text((package / "routing.py").read_text() + "\n# edited as it compiled\n")
    assert _native.stamp_build(package, digest, failed=False) == "the sources changed while they compiled"
    assert _native.guard(package) == "stale"
    assert _native.stamp_build(package, _native.source_digest(package), failed=False) is None
    assert _native.guard(package) == "compiled"


def test_pure_python_can_be_asked_for_at_run_time(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(package)
    monkeypatch.setenv("EMBEDGATE_PURE_PYTHON", "1")
    assert _native.guard(package) == "source"
    assert len(source_finders()) == 1


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="a working copy may hold edits newer than its build")
def test_ci_runs_the_compiled_build() -> None:
    # CI installs from scratch (pip install -e), which compiles: the suite then tests the code that is deployed.
    if os.environ.get("EMBEDGATE_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("EMBEDGATE_PURE_PYTHON is set")
    assert embedgate.NATIVE == "compiled"
    from embedgate import lean_trace, request
    from embedgate.providers import http1

    for module in (lean_trace, request, http1):
        assert module.__file__ is not None
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _awaits_in_handlers(tree: ast.AST) -> list[int]:
    """Lines of the ``try`` statements whose ``except`` or ``finally`` blocks await (or ``async with``/``for``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try | ast.TryStar):
            blocks = [handler.body for handler in node.handlers] + [node.finalbody]
            if any(
                isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)
                for block in blocks
                for statement in block
                for inner in ast.walk(statement)
            ):
                found.append(node.lineno)
    return found


def test_compiled_coroutines_never_await_inside_a_handler() -> None:
    """mypyc 2.4.1's coroutines lose track of the exception being handled across an ``await`` in an ``except`` or
    ``finally`` block: the router's split batches segfaulted that way. A compiled module keeps such cleanup after its
    handler (see ``routing.Router._serve_model``)."""
    offending = {
        name: lines
        for name in _native.COMPILED
        if (lines := _awaits_in_handlers(ast.parse((PACKAGE / f"{name}.py").read_text())))
    }
    assert offending == {}
    seen = "async def f():\n try:\n  await g()\n except E:\n  pass\n finally:\n  async with h:\n   pass\n"
    assert _awaits_in_handlers(ast.parse(seen)) == [2]  # the check sees one


def test_no_compiled_module_holds_a_final_tuple_of_floats() -> None:
    """mypyc 2.4.1 never sets a module's ``Final`` tuple holding a float for its compiled coroutines: the budget
    engine's undo task read ``(0.05, 0.5, ...)`` as a ``NameError`` and died, and no lost reserve was undone (seen
    only by CI's compiled run). Such a tuple is a local."""

    def final_float_tuple(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.value, ast.Tuple)
            and "Final" in ast.unparse(node.annotation)
            and any(isinstance(c, ast.Constant) and isinstance(c.value, float) for c in ast.walk(node.value))
        )

    offending = [
        (name, node.lineno)
        for name in _native.COMPILED
        for node in ast.parse((PACKAGE / f"{name}.py").read_text()).body
        if final_float_tuple(node)
    ]
    assert offending == []
    assert final_float_tuple(ast.parse("_D: Final = (0.05, 1)").body[0])  # the check sees one


#: GCC's keywords that a compiled class's attribute "_x" becomes as its C field "__x" (mypyc prefixes one "_").
_GCC_KEYWORDS = {"thread", "asm", "inline", "restrict", "attribute", "typeof", "const", "volatile", "signed",
                 "real", "imag", "complex", "int128", "auto_type", "label__", "extension__", "alignof"}  # fmt: skip


def test_compiled_attributes_are_no_c_keywords() -> None:
    """A log writer's ``self._thread`` became the C field ``__thread``, a GCC keyword: the whole build failed to
    compile, and installed the sources instead (seen only by CI's compiled run)."""
    offending = [
        (name, node.lineno, node.attr)
        for name in _native.COMPILED
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr[1:] in _GCC_KEYWORDS
    ]
    assert offending == []


def test_no_call_in_a_compiled_slice_but_len() -> None:
    """mypyc 2.4 evaluates a slice bound of a memoryview twice: ``piece[os.write(fd, piece):]`` wrote every log line
    twice in the compiled build. A bound computed before the slice is safe."""
    offending = [
        (name, node.lineno)
        for name in _native.COMPILED
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text()))
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice)
        for bound in (node.slice.lower, node.slice.upper, node.slice.step)
        if bound is not None
        for call in ast.walk(bound)
        if isinstance(call, ast.Call) and not (isinstance(call.func, ast.Name) and call.func.id == "len")
    ]
    assert offending == []


def test_written_out_initializers_set_every_field() -> None:
    # The request path's dataclasses write their ``__init__`` out (a generated one stays interpreted in the compiled
    # build): a field added later but not set there would be missing on every instance, caught here.
    from embedgate.budgets import Reservation
    from embedgate.cache import CachedItem
    from embedgate.errors import Dialect
    from embedgate.pipeline import Call
    from embedgate.request import CacheRequest, EmbeddingRequest
    from embedgate.routing import Attempts, RouteResult

    instances = [
        Call(dialect=Dialect.OPENAI, body=b"{}", request_id="r"),
        EmbeddingRequest(model="m", items=("a",), input_kind="string"),
        RouteResult(model="m", vectors=[], prompt_tokens=0, attempts=1, price_per_million_tokens=None),
        Attempts(),
        Reservation("r", "none"),
        CacheRequest(),
        CachedItem(b"\0\0\0\0", 1),
    ]
    for instance in instances:
        for f in dataclasses.fields(instance):
            assert hasattr(instance, f.name), (type(instance).__name__, f.name)
            if f.default is not dataclasses.MISSING:
                assert getattr(instance, f.name) == f.default, (type(instance).__name__, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                made = f.default_factory()  # a fresh empty container, or the clock's reading
                value = getattr(instance, f.name)
                assert type(value) is type(made) and (value == made or isinstance(made, float)), f.name
