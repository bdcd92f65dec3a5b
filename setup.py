"""Build: the modules of ``embedgate._native.COMPILED`` compiled to C extensions with mypyc (pyproject.toml holds
the rest of the metadata). ``EMBEDGATE_PURE_PYTHON=1 pip install ...`` installs the sources only; so does a build
that cannot compile (no C compiler): ``embedgate._native.guard`` runs the compiled modules only when all are there
and match their sources."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGE = Path(__file__).resolve().parent / "middleware" / "embedgate"


def _native() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedgate_native_build", PACKAGE / "_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BuildExt(build_ext):  # type: ignore[misc]
    """Stamps the build once the C compiler built every extension (see ``_native.stamp_build``)."""

    digest: str | None = None  # of the sources mypyc read, set by ext_modules

    def run(self) -> None:
        self._failed = False
        super().run()
        if _BuildExt.digest is None:
            return
        native = _native()
        why = native.stamp_build(PACKAGE, _BuildExt.digest, failed=self._failed)
        if why is not None:
            print(f"embedgate: not compiled ({why}); the build counts as stale", file=sys.stderr)
        if not self.inplace:  # a wheel, `pip install .`: the build directory's copy of the package gets it too
            built = Path(self.build_lib) / "embedgate" / native.STAMP
            if why is None:
                built.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(PACKAGE / native.STAMP, built)
            else:
                built.unlink(missing_ok=True)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception:  # an optional extension's failure is only warned about by setuptools: no stamp then
            self._failed = True
            raise


def ext_modules() -> list[Any]:
    native = _native()
    stamp = PACKAGE / native.STAMP
    stamp.unlink(missing_ok=True)  # until the new build is whole (see _native.stamp_build), the old one is stale
    if os.environ.get("EMBEDGATE_PURE_PYTHON", "") not in ("", "0"):
        return []  # extensions of an earlier build then count as stale, never run
    from mypyc.build import mypycify

    sources = [f"middleware/embedgate/{name}.py" for name in native.COMPILED]
    # Read before mypyc reads the sources: a source edited while it compiles (a minute or more) leaves the stamp
    # unwritten, so the build counts as stale instead of passing older code off as the sources on disk.
    digest = native.source_digest(PACKAGE)
    # Type-checked with the project's own mypy configuration (pyproject.toml), against the dependencies the build
    # environment holds (build-system.requires): the types the compiled code relies on are the ones the lint saw.
    try:
        extensions = mypycify(sources, opt_level="3", debug_level="0", group_name="embedgate")
    except SystemExit as exc:  # mypy refused the sources (a dependency's types changed, say): install them as they are
        print(f"embedgate: not compiled (mypyc: {exc}); the sources are installed as they are", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler (or a failed compile): installed as sources, which run as they are
    _BuildExt.digest = digest
    return extensions


setup(ext_modules=ext_modules(), cmdclass={"build_ext": _BuildExt})
