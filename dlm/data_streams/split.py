"""The held-out split: a document is held out when a hash of its text falls below a threshold.

The hash is a 64-bit blake2b digest of the text, so the split ignores file order, sharding and shuffling, and
duplicates of one text always land on the same side. Token shards store the same 64-bit hash per document,
which is why a run reading shards holds out exactly the documents a run reading the text would.
"""

from __future__ import annotations

import hashlib
import math

_HASH_RANGE = 2**64


def text_hash(text: str) -> int:
    """The document's 64-bit split hash (big-endian blake2b-8 of its UTF-8 bytes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def eval_threshold(eval_fraction: float) -> int:
    """Hashes strictly below this integer are held out.

    ``ceil`` makes the integer comparison agree exactly with ``hash < eval_fraction * 2**64``, so vectorised
    checks on stored uint64 hashes and checks on freshly hashed text never disagree at the boundary.
    """
    return min(math.ceil(eval_fraction * _HASH_RANGE), _HASH_RANGE - 1)


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether a document is held out (see the module docstring)."""
    return text_hash(text) < eval_threshold(eval_fraction)
