"""Properties of the blend plan (raycpt/data/plan.py): pure, so hypothesis checks it directly.

Each property is one promise of DESIGN.md "The blend and the data cursor": exact proportions per
batch, no repeat inside an epoch, the same sequence however a run is interrupted, resumed or
split over workers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from raycpt.data.plan import (
    BlendPlan,
    DataExhausted,
    PlanState,
    SourceOrder,
    SourceSpec,
    apportion,
    remap_state_by_name,
    sample_id,
    split_sample_id,
    worker_slice,
)

# Float slack on "less than one sample": targets are G*b*p in doubles, far below 1e-9 off.
_EPS = 1e-9

shard_rows = st.lists(st.integers(1, 50), min_size=1, max_size=5).map(tuple)
weight = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**32 - 1)


@dataclass
class Blend:
    sources: list[SourceSpec]
    weights: list[float]
    G: int  # global batch size, in sequences
    seed: int
    window_rows: int
    phases: list[tuple[int, list[float]]]

    def plan(self, state: PlanState | None = None, **changes) -> BlendPlan:
        kw = dict(sources=self.sources, weights=self.weights, global_batch_size=self.G, seed=self.seed,
                  window_rows=self.window_rows, phases=self.phases, state=state)
        kw.update(changes)
        return BlendPlan(**kw)

    @property
    def n(self) -> int:
        return len(self.sources)


@st.composite
def blends(draw, max_sources: int = 4, epochs=st.none(), phases: bool = False, max_phase_start: int = 30) -> Blend:
    n = draw(st.integers(1, max_sources))
    sources = [SourceSpec(f"src{i}", draw(shard_rows), draw(epochs)) for i in range(n)]
    weights = draw(st.lists(weight, min_size=n, max_size=n))
    phase_list: list[tuple[int, list[float]]] = []
    if phases:
        starts = sorted(draw(st.sets(st.integers(1, max_phase_start), min_size=1, max_size=2)))
        # A phase may switch a source off (weight 0) but keeps at least one on.
        phase_weight = st.one_of(st.just(0.0), weight)
        for start in starts:
            ws = draw(st.lists(phase_weight, min_size=n, max_size=n).filter(lambda ws: sum(ws) > 0))
            phase_list.append((start, ws))
    return Blend(sources, weights, draw(st.integers(1, 64)), draw(seeds), draw(st.integers(1, 64)), phase_list)


def per_source(ids: np.ndarray, n: int) -> np.ndarray:
    return np.bincount([split_sample_id(int(i))[0] for i in ids], minlength=n)


def run(plan: BlendPlan, batches: int) -> list[np.ndarray]:
    return [plan.next_batch() for _ in range(batches)]


def normalized(ws) -> np.ndarray:
    ws = np.asarray(ws, dtype=float)
    return ws / ws.sum()


def assert_each_epoch_once(ids, rows_of) -> None:
    """Per source: every epoch but the last holds each row exactly once; the last, no row twice."""
    by_source: dict[object, list[tuple[int, int]]] = {}
    for key, epoch, row in ids:
        by_source.setdefault(key, []).append((epoch, row))
    for key, draws in by_source.items():
        rows = rows_of[key]
        assert len(set(draws)) == len(draws), f"{key}: a row drawn twice in one epoch"
        epochs = Counter(e for e, _ in draws)
        last = max(epochs)
        # Epochs follow on: 0, 1, ..., last, all full except possibly the last.
        assert sorted(epochs) == list(range(last + 1)), f"{key}: epochs {sorted(epochs)}"
        assert all(epochs[e] == rows for e in range(last)), f"{key}: an epoch left rows out"
        assert all(0 <= r < rows for _, r in draws)


# 1. Proportions ------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(blend=blends(), batches=st.integers(1, 40))
def test_every_batch_keeps_each_source_within_one_sample_of_its_target(blend, batches):
    plan = blend.plan()
    p = normalized(blend.weights)
    counts = np.zeros(blend.n, dtype=np.int64)
    for b in range(1, batches + 1):
        ids = plan.next_batch()
        assert ids.shape == (blend.G,) and ids.dtype == np.int64
        counts += per_source(ids, blend.n)
        error = counts - blend.G * b * p
        assert np.all(np.abs(error) < 1 + _EPS), (b, counts.tolist(), (blend.G * b * p).tolist())
    assert plan.state.counts == counts.tolist()


def test_a_tiny_source_never_pushes_a_big_one_a_sample_behind():
    # Found by hypothesis against per-batch largest remainder: the two tiny sources got a slot each
    # early (large remainders), so later one batch had to take a slot from a big source, which fell
    # 1.02 samples behind at batch 161. The quota method (slot by slot) stays below 1.
    p = [0.0005738774191856531, 0.00014144354565487187, 0.6759303969810805, 0.32335428205407907]
    G = 17
    plan = BlendPlan([SourceSpec(f"s{i}", (1000,)) for i in range(4)], p, G, seed=0, window_rows=64)
    counts = np.zeros(4, dtype=np.int64)
    for b in range(1, 301):
        counts += per_source(plan.next_batch(), 4)
        assert np.all(np.abs(counts - G * b * normalized(p)) < 1 + _EPS), (b, counts.tolist())


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(weight, min_size=1, max_size=6), total=st.integers(0, 200))
def test_apportion_alone_stays_within_quota(weights, total):
    # From zero, the deficits are the exact quotas: every source gets floor or ceil of its quota.
    quota = total * normalized(weights)
    got = apportion(list(quota), total, [total] * len(weights), list(normalized(weights)))
    assert sum(got) == total
    assert np.all(np.abs(np.asarray(got) - quota) < 1 + _EPS), (got, quota.tolist())
    # Without weights, the deficits' own proportions are used.
    alone = apportion(list(quota), total, [total] * len(weights))
    assert sum(alone) == total and np.all(np.abs(np.asarray(alone) - quota) < 1 + _EPS)


# 2. Coverage, no repeats -------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 50), min_size=1, max_size=5).filter(lambda r: sum(r) > 0).map(tuple),
       seed=seeds, window=st.integers(1, 300), epochs=st.integers(1, 3))
def test_source_order_is_a_permutation_in_every_epoch(rows, seed, window, epochs):
    order = SourceOrder(SourceSpec("s", rows), 0, seed, window)
    n = sum(rows)
    for e in range(epochs):
        draws = [order.row_at(k) for k in range(e * n, (e + 1) * n)]
        assert {d[0] for d in draws} == {e}
        assert sorted(r for _, r in draws) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(blend=blends(), batches=st.integers(1, 40))
def test_plan_draws_every_row_once_per_epoch(blend, batches):
    plan = blend.plan()
    ids = np.concatenate(run(plan, batches))
    assert len(set(ids.tolist())) == len(ids)  # the epoch field keeps ids of later epochs distinct
    assert_each_epoch_once([split_sample_id(int(i)) for i in ids],
                           {s: spec.rows for s, spec in enumerate(blend.sources)})
    # The k-th draw of source s is row_at(k): the epoch field counts k // rows.
    for s, order in enumerate(plan.orders):
        drawn = sorted(int(i) for i in ids if split_sample_id(int(i))[0] == s)
        assert drawn == sorted(sample_id(s, *order.row_at(k)) for k in range(plan.state.counts[s]))
        assert all(order.row_at(k)[0] == k // order.rows for k in range(plan.state.counts[s]))


@settings(max_examples=100, deadline=None)
@given(source=st.integers(0, 200), epoch=st.integers(0, 2**20), row=st.integers(0, 2**40 - 1))
def test_sample_id_round_trips_and_an_epoch_never_spills_into_the_source(source, epoch, row):
    s, e, r = split_sample_id(sample_id(source, epoch, row))
    assert (s, r) == (source, row)
    assert e == epoch % (1 << 15)


# 3. Determinism, interruption -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(blend=blends(phases=True, epochs=st.one_of(st.none(), st.integers(1, 3))),
       batches=st.integers(1, 30), data=st.data())
def test_an_interrupted_plan_continues_exactly_like_a_straight_one(blend, batches, data):
    def until_exhausted(plan: BlendPlan, n: int) -> tuple[list[list[int]], bool]:
        out = []
        try:
            for _ in range(n):
                out.append(plan.next_batch().tolist())
        except DataExhausted:
            return out, True
        return out, False

    straight, straight_ended = until_exhausted(blend.plan(), batches)
    assert until_exhausted(blend.plan(), batches) == (straight, straight_ended)

    k = data.draw(st.integers(0, batches), label="interrupt at step")
    first = blend.plan()
    head, ended = until_exhausted(first, k)
    if not ended:
        # Through JSON, as a checkpoint stores it.
        saved = json.loads(json.dumps(first.state.state_dict()))
        assert saved["step"] == k
        tail, ended = until_exhausted(blend.plan(state=PlanState.from_state_dict(saved)), batches - k)
        head += tail
    assert (head, ended) == (straight, straight_ended)


# 4. Workers ---------------------------------------------------------------------------------------

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@settings(max_examples=40, deadline=None)
@given(blend=blends(), batches=st.integers(1, 12), data=st.data())
def test_worker_slices_partition_the_global_batch_whatever_the_world_size(blend, batches, data):
    batches_ids = run(blend.plan(), batches)
    for ids in batches_ids:
        for W in divisors(blend.G):
            slices = [worker_slice(ids, r, W) for r in range(W)]
            assert all(len(s) == blend.G // W for s in slices)
            assert np.array_equal(np.concatenate(slices), ids)
    bad = [W for W in range(2, blend.G + 2) if blend.G % W]
    if bad:
        with pytest.raises(ValueError):
            worker_slice(batches_ids[0], 0, bad[0])

    # Every worker computes the plan itself (no communication); W workers before an interruption
    # and W' after read exactly the global sequence.
    small = [d for d in divisors(blend.G) if d <= 8]
    W_before = data.draw(st.sampled_from(small), label="workers before")
    W_after = data.draw(st.sampled_from(small), label="workers after")
    k = data.draw(st.integers(0, batches), label="resume at step")
    workers = [blend.plan() for _ in range(W_before)]
    got = [np.concatenate([worker_slice(w.next_batch(), r, W_before) for r, w in enumerate(workers)])
           for _ in range(k)]
    saved = workers[0].state.state_dict()
    assert all(w.state.state_dict() == saved for w in workers)
    workers = [blend.plan(state=PlanState.from_state_dict(saved)) for _ in range(W_after)]
    got += [np.concatenate([worker_slice(w.next_batch(), r, W_after) for r, w in enumerate(workers)])
            for _ in range(batches - k)]
    assert all(np.array_equal(a, b) for a, b in zip(got, batches_ids))


# 5. Phases ----------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(blend=blends(phases=True, max_phase_start=25), batches=st.integers(1, 30))
def test_each_phase_keeps_its_own_proportions_from_its_start_step(blend, batches):
    plan = blend.plan()
    counts = np.zeros(blend.n, dtype=np.int64)
    seg_start, seg_counts, seg_p = 0, counts.copy(), normalized(blend.weights)
    for step in range(batches):
        p = normalized(blend.weights)
        for start, ws in blend.phases:
            if step >= start:
                p = normalized(ws)
        if not np.allclose(p, seg_p, rtol=0, atol=1e-12):  # new weights: a new segment from here
            seg_start, seg_counts, seg_p = step, counts.copy(), p
        drawn = per_source(plan.next_batch(), blend.n)
        assert np.all(drawn[p == 0] == 0), "a source switched off by the phase was drawn"
        counts += drawn
        target = seg_counts + blend.G * (step + 1 - seg_start) * seg_p
        assert np.all(np.abs(counts - target) < 1 + _EPS), (step, seg_start, counts.tolist(), target.tolist())
    assert plan.state.segment_start_step == seg_start


# 6. Epoch limits ----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(blend=blends(epochs=st.sampled_from([None, 1])), batches=st.integers(1, 60))
def test_a_source_with_epochs_1_is_read_once_and_the_others_fill_in(blend, batches):
    assume(any(s.epochs is None for s in blend.sources))
    plan = blend.plan()
    ids = []
    for _ in range(batches):
        batch = plan.next_batch()
        assert len(batch) == blend.G  # full even after a limited source ran out
        ids.extend(split_sample_id(int(i)) for i in batch)
    for s, spec in enumerate(blend.sources):
        if spec.epochs == 1:
            assert plan.state.counts[s] <= spec.rows
            assert {e for src, e, _ in ids if src == s} <= {0}
    assert_each_epoch_once(ids, {s: spec.rows for s, spec in enumerate(blend.sources)})


@settings(max_examples=40, deadline=None)
@given(blend=blends(epochs=st.integers(1, 2)))
def test_when_every_source_is_used_up_the_plan_says_so(blend):
    total = sum(s.rows * s.epochs for s in blend.sources)
    plan = blend.plan()
    ids = []
    for _ in range(total // blend.G):  # exactly this many full batches exist
        ids.extend(split_sample_id(int(i)) for i in plan.next_batch())
    for _ in range(2):  # and it keeps saying so
        with pytest.raises(DataExhausted):
            plan.next_batch()
    assert plan.state.step == total // blend.G
    for s, spec in enumerate(blend.sources):
        assert plan.state.counts[s] <= spec.rows * spec.epochs
        assert sum(1 for src, _, _ in ids if src == s) == plan.state.counts[s]
    assert_each_epoch_once(ids, {s: spec.rows for s, spec in enumerate(blend.sources)})


def test_a_source_without_weight_never_fills_a_batch():
    # Phase 1 switches the unlimited source off; when the limited one runs out mid-batch the batch
    # cannot be filled from a source the user turned off.
    sources = [SourceSpec("limited", (9,), epochs=1), SourceSpec("off", (100,))]
    plan = BlendPlan(sources, [1.0, 1.0], 4, seed=0, window_rows=8, phases=[(1, [1.0, 0.0])])
    first = per_source(plan.next_batch(), 2)
    assert first.tolist() == [2, 2]
    assert per_source(plan.next_batch(), 2).tolist() == [4, 0]
    with pytest.raises(DataExhausted):  # 3 rows of "limited" left: no full batch without "off"
        plan.next_batch()


# 7. Changing the sources at resume ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(blend=blends(), before=st.integers(0, 15), after=st.integers(1, 15), data=st.data())
def test_remap_carries_counts_by_name_and_starts_a_new_segment(blend, before, after, data):
    old_names = [s.name for s in blend.sources]
    kept = data.draw(st.lists(st.sampled_from(old_names), unique=True, max_size=blend.n), label="kept")
    added = [f"fresh{i}" for i in range(data.draw(st.integers(0 if kept else 1, 2), label="added"))]
    new_names = data.draw(st.permutations(kept + added), label="new order")
    by_name = {s.name: s for s in blend.sources}
    new_sources = [by_name.get(n) or SourceSpec(n, data.draw(shard_rows, label=n)) for n in new_names]
    new_weights = data.draw(st.lists(weight, min_size=len(new_names), max_size=len(new_names)), label="weights")

    old_plan = blend.plan()
    old_ids = run(old_plan, before)
    saved = json.loads(json.dumps(old_plan.state.state_dict()))
    state = remap_state_by_name(saved, old_names, new_names)
    old_counts = dict(zip(old_names, old_plan.state.counts))
    assert state.counts == [old_counts.get(n, 0) for n in new_names]
    assert state.step == before

    plan = blend.plan(state=state, sources=new_sources, weights=new_weights, phases=[])
    p = normalized(new_weights)
    start_counts = np.asarray(state.counts)
    counts = start_counts.copy()
    new_ids = []
    for b in range(1, after + 1):
        batch = plan.next_batch()
        if b == 1:  # the new blend counts from the resume step, not from step 0
            assert plan.state.segment_start_step == before
            assert plan.state.segment_start_counts == start_counts.tolist()
        counts += per_source(batch, len(new_names))
        assert np.all(np.abs(counts - start_counts - blend.G * b * p) < 1 + _EPS)
        new_ids.append(batch)
    assert plan.state.step == before + after

    # A kept source continues its epoch where it stopped, even at another index: no row twice.
    named = [(old_names[s], e, r) for batch in old_ids for s, e, r in map(split_sample_id, map(int, batch))]
    named += [(new_names[s], e, r) for batch in new_ids for s, e, r in map(split_sample_id, map(int, batch))]
    assert_each_epoch_once(named, {s.name: s.rows for s in new_sources + blend.sources})


# 8. Shards ----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(0, 50), min_size=1, max_size=6).filter(lambda r: sum(r) > 0).map(tuple))
def test_locate_inverts_the_concatenation_of_shards(rows):
    order = SourceOrder(SourceSpec("s", rows), 0, 0, 16)
    concatenated = [(shard, i) for shard, n in enumerate(rows) for i in range(n)]
    assert [order.locate(row) for row in range(sum(rows))] == concatenated


# 9. Shuffle ---------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(1, 50), min_size=1, max_size=5).filter(lambda r: sum(r) >= 20).map(tuple),
       seed=seeds, other_seed=seeds, extra_window=st.integers(0, 100))
def test_a_window_as_large_as_the_source_shuffles_it_all_by_seed(rows, seed, other_seed, extra_window):
    assume(seed != other_seed)
    n = sum(rows)
    spec = SourceSpec("s", rows)

    def epoch(order: SourceOrder, e: int) -> list[int]:
        return [order.row_at(k)[1] for k in range(e * n, (e + 1) * n)]

    order = SourceOrder(spec, 0, seed, n + extra_window)
    first = epoch(order, 0)
    assert sorted(first) == list(range(n))
    # n >= 20: the identity (or an equal order by chance) has probability <= 1/20!.
    assert first != list(range(n))
    assert epoch(SourceOrder(spec, 0, seed, n + extra_window), 0) == first  # seeded
    assert epoch(SourceOrder(spec, 0, other_seed, n + extra_window), 0) != first
    assert epoch(order, 1) != first  # every epoch is reshuffled
