"""The standalone gateway reuses freed memory for big answers instead of faulting in fresh pages each time.

Allocator settings are process-wide and cannot be undone, so each case runs in its own interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedgate.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent

# What a 256 x 1536 batch does per request: the upstream's 2.1 MB answer read in chunks and joined, then the
# client's answer built from it. Prints the page faults per request once warm.
PROGRAM = textwrap.dedent(
    """
    import asyncio, resource, sys

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def request():
        chunks = [b"c" * (256 << 10) for _ in range(9)]
        body = b"".join(chunks)
        del chunks
        return len(b"{" + body + b"}")

    async def main(mode):
        app = None
        if mode == "tuned":
            from embedgate.memory import keep_freed_memory
            assert keep_freed_memory()
        elif mode in ("standalone", "mounted"):
            from embedgate import EmbeddingGateway, create_app
            from embedgate.config import parse_config
            from tests.conftest import config_dict

            config = parse_config(config_dict("http://127.0.0.1:9"), env={})
            app = create_app(config) if mode == "standalone" else EmbeddingGateway(lambda *a: None, config=config)
            await app.startup()
        for _ in range(3):
            request()
        before = faults()
        for _ in range(20):
            request()
        print((faults() - before) / 20)
        if app is not None:
            await app.shutdown()

    asyncio.run(main(sys.argv[1]))
    """
)

glibc = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's allocator settings")


def faults_per_request(mode: str, **env: str) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


@glibc
def test_freed_big_buffers_are_reused_instead_of_faulted_in_again() -> None:
    # ~1,000 pages a request with glibc's defaults: the buffers are mapped fresh, or the heap top is trimmed
    assert faults_per_request("plain") > 500
    assert faults_per_request("tuned") < 20


@glibc
def test_a_standalone_gateway_keeps_freed_memory_and_a_mounted_one_leaves_the_host_alone() -> None:
    assert faults_per_request("standalone") < 20
    assert faults_per_request("mounted") > 500


@glibc
def test_the_operators_own_malloc_settings_are_kept() -> None:
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
    assert keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) is False
    # in a served gateway: its setting stands, so the batch pattern faults as it asked
    assert faults_per_request("standalone", MALLOC_TRIM_THRESHOLD_="131072") > 500
