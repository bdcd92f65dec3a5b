"""The standalone gateway's allocator settings: freed memory kept for the next request.

With glibc's defaults, a buffer past the mmap threshold (128 KiB at first, raised to the size of the big buffers
freed since) is mapped fresh from the kernel and unmapped when freed, and free memory at the top of the heap is
handed back once it passes the trim threshold (twice the mmap one). A batch's answers are such buffers (256 x
1536 dims: 2.1 MB read from the upstream, 2.1 MB sent to the client), so each request paid ~1,000-1,400 page
faults to touch new pages (measured: a 256-input miss at 1 connection took ~9.5-10.5 ms of CPU with them, ~5.2-5.5
without).

:func:`keep_freed_memory` raises both limits, once, for the process: buffers up to 32 MiB come from the heap
and are reused, and the heap keeps up to 128 MiB of free memory before trimming. The cost is that the
process's RSS stays near its busiest moment's (within those 128 MiB) instead of shrinking after it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Buffers up to this size come from the heap: glibc's largest accepted value on 64-bit systems.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse before it is handed back to the kernel.
TRIM_THRESHOLD = 128 * 1024 * 1024

#: An operator who set any of these chose the allocator's behaviour: theirs is kept.
_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Set glibc's mmap and trim thresholds for this process; whether they were set.

    Nothing is done (``False``) off glibc (musl, macOS), or when the environment already sets glibc's malloc
    tunables (``MALLOC_*_`` variables or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``).
    """
    if any(name in environ for name in _OPERATOR_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (ValueError, OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 on success; the mmap threshold first, as setting either one ends glibc's adaptation.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
