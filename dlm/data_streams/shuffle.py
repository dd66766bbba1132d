"""Deterministic randomness for the data order: seeds derived from (seed, epoch, ...), a memory-free
permutation for random-access sources, and the split of source pieces over consumers.

Everything here is a pure function of its arguments, which is what makes the data order reproducible and a
resumed stream exact: nothing random is ever drawn from global state or saved.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, "epoch", 3, consumer 5)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def rng(*parts: int | str) -> np.random.Generator:
    """A numpy generator seeded by :func:`derive_seed` of ``parts``."""
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of ``x + key`` (uint64, wrapping): the Feistel round function."""
    z = x + np.uint64(key & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """A pseudo-random bijection of ``[0, n)`` computed index by index, with O(1) memory.

    A balanced Feistel network over the smallest even number of bits that covers ``n`` is a bijection of
    ``[0, 2**bits)``; "cycle walking" (re-applying it until the value lands below ``n``) restricts it to a
    bijection of ``[0, n)``. Because ``2**bits < 4 n``, a value needs fewer than four rounds on average. This
    lets a consumer read position ``i`` of a shuffled epoch over billions of documents without materialising
    a permutation, and resume at any position for free.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        self.n = n
        half = max(1, math.ceil(max(n - 1, 1).bit_length() / 2))
        self._half = np.uint64(half)
        self._low = np.uint64((1 << half) - 1)
        self._keys = [derive_seed(key, "round", r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._low
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._low)
        return (left << self._half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """The images of ``index`` (any integer array with values in ``[0, n)``) as int64."""
        out = self._encrypt(np.asarray(index, dtype=np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


@dataclass(frozen=True)
class PiecePlan:
    """Which source pieces one consumer reads in an epoch, and which of their rows it keeps.

    ``pieces`` are indices into the source's piece list, in reading order. The rows of those pieces are
    numbered 0, 1, 2, ... in that order; the consumer keeps row ``j`` when ``j % stride == offset``.
    """

    pieces: tuple[int, ...]
    stride: int
    offset: int


def plan_pieces(num_pieces: int, num_consumers: int, consumer: int, order: np.ndarray) -> PiecePlan:
    """Split ``num_pieces`` pieces (visited in ``order``) over ``num_consumers`` so each row goes to exactly one.

    With ``g = gcd(pieces, consumers)`` the pieces form ``g`` groups and the consumers ``g`` teams; a team
    reads its group's pieces and its ``consumers / g`` members take turns row by row. When pieces divide
    evenly each consumer reads whole pieces of its own (no wasted reads); with fewer pieces than consumers
    (one big file, 6 ranks x workers) every row still goes to exactly one consumer, at the price of each
    member reading the rows the others keep.
    """
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} is outside [0, {num_consumers})")
    groups = math.gcd(num_pieces, num_consumers)
    group, member = consumer % groups, consumer // groups
    pieces = tuple(int(p) for p in order[group::groups])
    return PiecePlan(pieces=pieces, stride=num_consumers // groups, offset=member)
