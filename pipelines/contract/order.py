"""The order of an epoch's samples: a pure function of (seed, epoch, the epoch's shards), computed
position by position, so that no process ever holds the order of the whole epoch. Every reader
follows it: the GPT trainer over token shards, the tokenizer trainer over an input's work items.

Two orders:

- **global**: a pseudo-random permutation of all N samples (:class:`Permutation`, a Feistel
  network over the next power of four above N, cycle-walked into [0, N)). Any batch can hold any
  sample, so a class-sorted input (ImageNet's folder layout) is mixed from the first step. Every
  shard is touched from the first steps on, so it is the order for a set that fits the node cache.
- **window**: shards are permuted, cut into windows of ``window_shards`` consecutive shards, and the
  samples of each window are permuted together. A process needs one window of shards at a time:
  the fallback for a set larger than the node cache. A batch mixes up to ``window_shards`` shards
  only, so when each shard holds one class a window sees at most that many classes.

Either way ``order.at(p)`` is the sample id at position ``p`` of the epoch; rank ``r`` of ``W``
takes positions ``consumed + r + k*W`` (see :func:`rank_positions`), so all ranks together always
consume a prefix of one sequence, whatever the world size: a resume is one number.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

ORDERS = ("global", "window")
_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """SplitMix64's finaliser of ``x ^ key``: a well-spread 64-bit hash (the Feistel round function)."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A bijection of [0, n) drawn by (seed, epoch), evaluated at any positions in O(1) memory each.

    Feistel rounds on ``2h`` bits (``4**h >= n``) are a bijection whatever the round function;
    positions that land at or past ``n`` are encrypted again until they fall inside (cycle walking
    keeps the bijection, and since ``4**h < 4n`` the expected number of walks is below 4)."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        self.half = max(1, (max(1, self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, size=_ROUNDS, dtype=np.int64)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        y = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._encrypt(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


class EpochOrder:
    """Sample ids by epoch position, for shards of ``rows`` samples (ids are offsets into them)."""

    def __init__(self, rows: np.ndarray, seed: int, epoch: int, mode: str, window_shards: int, shuffle: bool = True):
        if mode not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {mode!r}")
        self.rows = np.asarray(rows, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.seed, self.epoch, self.mode, self.shuffle = seed, epoch, mode, shuffle
        self.window_shards = max(1, int(window_shards))
        if shuffle and mode == "global":
            self.perm = Permutation(self.n, seed, epoch)
        if shuffle and mode == "window":
            self.shard_perm = np.random.default_rng([seed, epoch]).permutation(len(self.rows))
            sizes = [self.rows[self.shard_perm[w : w + self.window_shards]].sum()
                     for w in range(0, len(self.rows), self.window_shards)]
            self.window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._windows: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.n

    def _window(self, w: int) -> np.ndarray:
        """The sample ids of window ``w`` in their shuffled order (the last two are kept)."""
        if w not in self._windows:
            shards = self.shard_perm[w * self.window_shards : (w + 1) * self.window_shards]
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards])
            self._windows[w] = ids[np.random.default_rng([self.seed, self.epoch, w]).permutation(len(ids))]
            if len(self._windows) > 2:
                self._windows.popitem(last=False)
        return self._windows[w]

    def at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at ``positions`` (each in [0, n)) of this epoch's order."""
        positions = np.asarray(positions, np.int64)
        if not self.shuffle:
            return positions.copy()
        if self.mode == "global":
            return self.perm(positions)
        out = np.empty_like(positions)
        windows = np.searchsorted(self.window_starts, positions, side="right") - 1
        for w in np.unique(windows):
            sel = windows == w
            out[sel] = self._window(int(w))[positions[sel] - self.window_starts[w]]
        return out

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, ids, side="right") - 1


def rank_positions(n: int, consumed: int, rank: int, world: int, worker: int = 0, workers: int = 1,
                   batch: int = 1, block: int = 1 << 16) -> Iterator[np.ndarray]:
    """Epoch positions of one rank's (and one of its DataLoader workers') samples, in blocks.

    The rank takes positions ``consumed + rank + k*world``; its workers take turns by whole batches
    of ``batch`` (worker ``w`` yields the rank's batches ``w, w + workers, ...``), so whatever the
    workers, a rank that consumed ``k`` batches consumed its first ``k * batch`` positions."""
    total = max(0, -(-(n - consumed - rank) // world))  # this rank's remaining positions
    step = block - block % (batch * workers) or batch * workers  # whole rounds of the workers' batches
    for start in range(0, total, step):
        k = np.arange(start, min(total, start + step), dtype=np.int64)
        if workers > 1:
            k = k[(k // batch) % workers == worker]
        yield consumed + rank + k * world
