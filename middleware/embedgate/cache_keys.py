"""The exact-match cache's keys (SPEC section 6), one per input item; compiled, as a batch makes one per item.

A key is ``eg:c:`` and the urlsafe base64, unpadded, of the SHA-256 of the JSON array
``[version, workspace, model, dimensions, input_type, item]`` (strings quoted and escaped, dict keys sorted), so
distinct inputs cannot encode alike and a string never collides with a token array. Keys already in a shared Redis
keep matching across releases: a change of the key material or of the stored form bumps ``KEY_VERSION`` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

import orjson
from pybase64 import b64encode

__all__ = ["KEY_PREFIX", "KEY_VERSION", "item_keys"]

KEY_PREFIX: Final = "eg:c:"
#: Bumped whenever the key material or the stored format changes: old entries then simply stop matching.
KEY_VERSION: Final = "v1"
_URLSAFE: Final = b"-_"  # for + and /
_SORT_KEYS: Final = orjson.OPT_SORT_KEYS
_ZERO: Final = b"\0"


def item_keys(
    *,
    workspace: str,
    model: str,
    dimensions: int | None,
    input_type: str | None,
    items: Sequence[Any],
) -> list[str]:
    """The cache keys of ``items`` for ``model`` (the model that serves) in ``workspace``, in order.

    Encoding format, name, user, identity and routing options are deliberately not part of a key. The array's
    head is the same for every item of a request: it is serialized and hashed once, and each item's hash goes on
    from a copy of that state (a fresh OpenSSL hash per item costs more than the item's own bytes).
    """
    if not items:
        return []
    head_json = orjson.dumps((KEY_VERSION, workspace, model, dimensions, input_type))[:-1] + b","
    digests: list[bytes] = []
    if len(items) == 1:  # one item (most requests): one hash of the whole array, no state to copy
        digests.append(hashlib.sha256(head_json + orjson.dumps(items[0], option=_SORT_KEYS) + b"]").digest())
    else:
        head = hashlib.sha256(head_json)
        for item in items:
            h = head.copy()
            h.update(orjson.dumps(item, option=_SORT_KEYS) + b"]")
            digests.append(h.digest())
    # One base64 pass for all of them: each 32-byte digest and a zero byte are 33 bytes, 44 characters, so the
    # encodings sit side by side; the first 43 of each are the digest's own unpadded encoding (the 43rd holds the
    # digest's last 4 bits and 2 zero bits, as the padded encoding's does).
    digests.append(b"")
    text = b64encode(_ZERO.join(digests), altchars=_URLSAFE).decode("ascii")  # pybase64: ~20 us less for 256
    return [KEY_PREFIX + text[i : i + 43] for i in range(0, len(text), 44)]
