"""The blend plan: which sample fills each slot of each global batch. Pure, no I/O.

The global sample sequence is a function of (sources' row counts, weights and phases, seed,
global batch size, shuffle window) and of the plan state alone, so a run resumed at any step on
any number of workers reads exactly what an uninterrupted run reads.

Proportions: before each batch every active source s has a cumulative target
``T_s = C_s(seg) + G * (b + 1 - seg) * p_s`` (seg: the step where the current weights began).
The batch hands out its slots one at a time by the quota method (`apportion`), so a source's
count stays less than one sample from its target after every batch, however long the run.

Order inside a source: epoch e visits the source's shards in a seeded order, and rows inside
consecutive windows of `shuffle_window_rows` in a seeded order, so every row appears once per
epoch and a reader only ever needs one window's row groups at a time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from raycpt.errors import RaycptError

# A sample id packs (source, epoch, row) into one int64 for logs and equivalence tests.
_ROW_BITS = 40
_EPOCH_BITS = 15


def sample_id(source: int, epoch: int, row: int) -> int:
    # The epoch wraps (a tiny source cycled for long) instead of spilling into the source bits,
    # which the reader uses to find the row.
    return (source << (_ROW_BITS + _EPOCH_BITS)) | ((epoch & ((1 << _EPOCH_BITS) - 1)) << _ROW_BITS) | row


def split_sample_id(sid: int) -> tuple[int, int, int]:
    return sid >> (_ROW_BITS + _EPOCH_BITS), (sid >> _ROW_BITS) & ((1 << _EPOCH_BITS) - 1), sid & ((1 << _ROW_BITS) - 1)


class DataExhausted(RaycptError, RuntimeError):
    """Every source has used up its `epochs`."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    shard_rows: tuple[int, ...]  # rows per shard file, in manifest order
    epochs: int | None = None  # None: cycle forever

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)


class SourceOrder:
    """Row order of one source: row_at(k) is the k-th row drawn from it (epochs follow on).

    The order is seeded by the source's name, not its index, so a resume that adds, drops or
    reorders sources (`remap_state_by_name`) continues each source's epoch in the same order.
    """

    def __init__(self, spec: SourceSpec, source_index: int, seed: int, window_rows: int):
        self.spec = spec
        self.index = source_index
        self.seed = seed
        self._key = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
        self.window = window_rows
        self.rows = spec.rows
        self._starts = np.concatenate([[0], np.cumsum(spec.shard_rows)])
        self._epoch_cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._window_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, self._key, epoch, 0])
            perm = rng.permutation(len(self.spec.shard_rows))
            sizes = np.asarray(self.spec.shard_rows)[perm]
            self._epoch_cache[epoch] = (perm, np.concatenate([[0], np.cumsum(sizes)]), sizes)
            while len(self._epoch_cache) > 2:
                self._epoch_cache.popitem(last=False)
        return self._epoch_cache[epoch]

    def _window_perm(self, epoch: int, w: int, size: int) -> np.ndarray:
        key = (epoch, w)
        if key not in self._window_cache:
            rng = np.random.default_rng([self.seed, self._key, epoch, 1, w])
            self._window_cache[key] = rng.permutation(size)
            while len(self._window_cache) > 4:
                self._window_cache.popitem(last=False)
        return self._window_cache[key]

    def row_at(self, k: int) -> tuple[int, int]:
        """(epoch, row index within the source in manifest order) of the k-th draw."""
        epoch, pos = divmod(k, self.rows)
        perm, offsets, _ = self._epoch_layout(epoch)
        w = pos // self.window
        start = w * self.window
        size = min(self.window, self.rows - start)
        q = start + int(self._window_perm(epoch, w, size)[pos - start])
        slot = int(np.searchsorted(offsets, q, side="right") - 1)
        shard = int(perm[slot])
        return epoch, int(self._starts[shard] + (q - offsets[slot]))

    def locate(self, row: int) -> tuple[int, int]:
        """(shard index, row within shard) of a source row."""
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        return shard, int(row - self._starts[shard])


@dataclass
class PlanState:
    """Everything a checkpoint needs to continue the sequence: global, never per rank."""

    step: int = 0  # next global batch index
    counts: list[int] = field(default_factory=list)  # samples drawn per source so far
    segment_start_step: int = 0
    segment_start_counts: list[int] = field(default_factory=list)
    segment_weights: list[float] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "counts": list(self.counts), "segment_start_step": self.segment_start_step,
                "segment_start_counts": list(self.segment_start_counts),
                "segment_weights": None if self.segment_weights is None else list(self.segment_weights)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "PlanState":
        return cls(step=int(d["step"]), counts=[int(c) for c in d["counts"]],
                   segment_start_step=int(d["segment_start_step"]),
                   segment_start_counts=[int(c) for c in d["segment_start_counts"]],
                   segment_weights=None if d["segment_weights"] is None else [float(w) for w in d["segment_weights"]])


def apportion(deficits: Sequence[float], total: int, caps: Sequence[int],
              weights: Sequence[float] | None = None) -> list[int]:
    """Split `total` slots among sources, one slot at a time, by the quota method.

    `deficits[i]` is source i's cumulative target at the end of these `total` slots minus what it
    has drawn so far, `weights[i]` its share of every slot (default: the deficits' proportions) and
    `caps[i]` the most it may get. Each slot goes, among the sources that the slot would not put a
    full sample ahead of their target, to the one that would fall a full sample behind first
    (earliest deadline; ties to the lower index). This is Balinski & Young's quota method: it is
    house monotone and keeps every source within one sample of its cumulative target after every
    slot, so also at every batch boundary. Largest remainder per batch does not: it can hand a
    small source a slot early (its remainder is large) and later has to take a slot back from a
    big one, which then falls more than one sample behind (Alabama paradox).
    """
    n = len(deficits)
    if weights is None:
        pos = [max(float(d), 0.0) for d in deficits]
        weights = [d / sum(pos) for d in pos] if sum(pos) > 0 else [0.0] * n
    counts = [0] * n
    live = [i for i in range(n) if weights[i] > 0 and caps[i] > 0]
    for j in range(total):
        later = total - 1 - j  # slots of this call still to come after slot j
        open_ = [i for i in live if counts[i] < caps[i]]
        if not open_:
            break
        # Released: one more would stay below target + 1 at the end of slot j (1e-9: float slack).
        released = [i for i in open_ if counts[i] < deficits[i] - weights[i] * later + 1e-9]
        # Exact arithmetic always releases a source; with a cap hit, fill from the most behind.
        pick_from = released or open_
        i = min(pick_from, key=lambda i: ((counts[i] + 1 - deficits[i]) / weights[i], i))
        counts[i] += 1
    return counts


class BlendPlan:
    """Deterministic global batches over weighted sources.

    `phases` is a list of (start_step, weights) in step order; step 0 uses `weights`.
    """

    def __init__(self, sources: Sequence[SourceSpec], weights: Sequence[float], global_batch_size: int,
                 seed: int, window_rows: int, phases: Sequence[tuple[int, Sequence[float]]] = (),
                 state: PlanState | None = None):
        if len(weights) != len(sources):
            raise ValueError("one weight per source")
        self.sources = list(sources)
        self.base_weights = [float(w) for w in weights]
        self.phases = [(int(s), [float(w) for w in ws]) for s, ws in phases]
        self.G = int(global_batch_size)
        self.seed = int(seed)
        self.orders = [SourceOrder(s, i, seed, window_rows) for i, s in enumerate(sources)]
        self.state = state or PlanState(counts=[0] * len(sources), segment_start_counts=[0] * len(sources))

    # -- weights in force -------------------------------------------------------------------------
    def _caps(self) -> list[int | None]:
        return [None if s.epochs is None else s.epochs * s.rows - c for s, c in zip(self.sources, self.state.counts)]

    def _weights_for(self, step: int) -> list[float]:
        ws = self.base_weights
        for start, phase_ws in self.phases:
            if step >= start:
                ws = phase_ws
        caps = self._caps()
        ws = [0.0 if (cap is not None and cap <= 0) else w for w, cap in zip(ws, caps)]
        total = sum(ws)
        if total <= 0:
            raise DataExhausted(
                f"step {step}: every source with weight > 0 has used its data.sources[*].epochs; "
                "raise epochs, add data or lower train.max_steps"
            )
        return [w / total for w in ws]

    # -- the sequence -----------------------------------------------------------------------------
    def _next_counts(self) -> list[int]:
        """Samples each source gives the next global batch (starts a new weight segment when the
        weights in force change); the counts themselves are left to the caller to advance."""
        st = self.state
        ws = self._weights_for(st.step)
        if st.segment_weights is None or not np.allclose(ws, st.segment_weights, rtol=0, atol=1e-12):
            st.segment_weights = ws
            st.segment_start_step = st.step
            st.segment_start_counts = list(st.counts)
        elapsed = st.step + 1 - st.segment_start_step
        targets = [c0 + self.G * elapsed * w for c0, w in zip(st.segment_start_counts, ws)]
        deficits = [t - c if w > 0 else -1.0 for t, c, w in zip(targets, st.counts, ws)]
        # A source without weight in force is never drawn, even to fill a batch.
        caps = [0 if w <= 0 else self.G if cap is None else max(0, min(self.G, cap))
                for cap, w in zip(self._caps(), ws)]
        per_source = apportion(deficits, self.G, caps, ws)
        if sum(per_source) < self.G:
            raise DataExhausted(f"step {st.step}: the sources ran out of rows for a full global batch "
                                "(data.sources[*].epochs); raise epochs or lower train.max_steps")
        return per_source

    def next_batch(self) -> np.ndarray:
        """Sample ids of the next global batch, in slot order (int64 [G]); advances the state."""
        st = self.state
        per_source = self._next_counts()
        ids = np.empty(self.G, dtype=np.int64)
        j = 0
        for s, n in enumerate(per_source):
            for k in range(st.counts[s], st.counts[s] + n):
                epoch, row = self.orders[s].row_at(k)
                ids[j] = sample_id(s, epoch, row)
                j += 1
            st.counts[s] += n
        # Mix sources across the batch so every worker's slice sees the blend.
        ids = ids[np.random.default_rng([self.seed, 2, st.step]).permutation(self.G)]
        st.step += 1
        return ids

    def advance(self) -> None:
        """Move the state past the next global batch without building its sample ids: the same
        state as `next_batch`, for a holder of the position that never reads rows."""
        for s, n in enumerate(self._next_counts()):
            self.state.counts[s] += n
        self.state.step += 1

    def skip_to(self, step: int) -> None:
        while self.state.step < step:
            self.advance()

    def tokens_per_source(self, seq_len: int) -> dict[str, int]:
        return {s.name: c * seq_len for s, c in zip(self.sources, self.state.counts)}


def worker_slice(batch_ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous part of a global batch that one worker trains on."""
    G = batch_ids.shape[0]
    if G % world_size:
        raise ValueError(f"global batch {G} is not divisible by {world_size} workers")
    per = G // world_size
    return batch_ids[rank * per:(rank + 1) * per]


def remap_state_by_name(state: dict[str, Any], old_names: list[str], new_names: list[str]) -> PlanState:
    """Carry counts over to a changed list of sources (an intended blend change at resume).

    Sources keep their drawn count by name; new sources start at 0. The weights start a new
    segment at the resume step, so the new blend applies from there on.
    """
    old = PlanState.from_state_dict(state)
    by_name = dict(zip(old_names, old.counts))
    counts = [by_name.get(n, 0) for n in new_names]
    return PlanState(step=old.step, counts=counts, segment_start_step=old.step,
                     segment_start_counts=list(counts), segment_weights=None)
