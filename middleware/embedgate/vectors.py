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
    try:
        arr = np.asarray(values, dtype=_F32)
    except (TypeError, ValueError):
        raise VectorError("an embedding must be a list of numbers") from None
    if arr.ndim != 1:
        raise VectorError("an embedding must be a flat list of numbers")
    return arr.tobytes()


def bytes_to_b64(vector: bytes) -> bytes:
    """The base64 form (ASCII bytes) clients asked for with ``encoding_format: base64``."""
    return pybase64.b64encode(vector)


def bytes_to_floats(vector: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A float32 array view (no copy) that orjson serializes as a JSON float list, shortest float32 repr."""
    return np.frombuffer(vector, dtype=_F32)
