"""Vectors inside the proxy are little-endian float32 bytes; this module converts at the two edges.

Upstream answers arrive as base64 (asked for: 4x less data than JSON floats) or as float lists (providers that
ignore ``encoding_format``); clients get exactly the ``encoding_format`` they asked for.
"""

from __future__ import annotations

import binascii
from typing import Any

import numpy as np
import pybase64

__all__ = ["VectorError", "b64_to_bytes", "bytes_to_b64", "bytes_to_floats", "floats_to_bytes"]

_F32 = np.dtype("<f4")


class VectorError(ValueError):
    """An upstream vector could not be decoded."""


def b64_to_bytes(data: str | bytes | memoryview) -> bytes:
    """Decode a base64 float32 vector, checking it holds whole float32 values."""
    try:
        # pybase64 (SIMD): ~20x faster than the standard library on 6 KB vectors, which matters for batches
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VectorError(f"invalid base64 embedding: {exc}") from None
    if not raw or len(raw) % 4:
        raise VectorError(f"a base64 embedding of {len(raw)} bytes is not a float32 vector")
    return raw


def floats_to_bytes(values: Any) -> bytes:
    """Pack a JSON float list into float32 bytes, rejecting anything that is not a flat list of numbers."""
    if not isinstance(values, list) or not values:
        raise VectorError("an embedding must be a non-empty list of numbers")
    # Without a dtype, numpy tells the values' kinds: a string, null or true (which a float32 conversion would
    # take as a number, NaN or 1.0) makes it text, object or bool, a number too large for a float64 infinite.
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        raise VectorError("an embedding must be a list of numbers") from None
    if arr.ndim != 1:
        raise VectorError("an embedding must be a flat list of numbers")
    if arr.dtype.kind not in "fiu":
        raise VectorError("an embedding must be a list of numbers")
    # Mixed with numbers, true and false became 1.0 and 0.0: looked for only where such values are (rarely).
    if ((arr == 0) | (arr == 1)).any() and bool in set(map(type, values)):
        raise VectorError("an embedding must be a list of numbers")
    with np.errstate(over="ignore"):  # an overflow is refused just below, not warned about
        out = arr.astype(_F32)
    if not np.isfinite(out).all():  # NaN, infinity, or a number beyond float32's range
        raise VectorError("an embedding holds NaN, infinity or a number beyond float32's range")
    return out.tobytes()


def bytes_to_b64(vector: bytes) -> bytes:
    """The base64 form (ASCII bytes) clients asked for with ``encoding_format: base64``."""
    return pybase64.b64encode(vector)


def bytes_to_floats(vector: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A float32 array view (no copy) that orjson serializes as a JSON float list, shortest float32 repr."""
    return np.frombuffer(vector, dtype=_F32)
