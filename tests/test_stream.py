"""The data stream as the one holder of the data position: it follows the batches the loop takes
without building their sample ids, and a long run's next Ray Data dataset starts from it, so the
training process never replays the plan."""

from __future__ import annotations

import cProfile
import pstats

import numpy as np

from conftest import tiny_job_tree
from raycpt.config import parse_job
from raycpt.data.plan import worker_slice
from raycpt.data.stream import DataStream, build_plan, make_spec, read_manifests


def calls_in_this_process(profile: cProfile.Profile, function: str) -> int:
    stats = pstats.Stats(profile).stats  # {(file, line, name): (primitive calls, calls, ...)}
    return sum(v[1] for (path, _, name), v in stats.items() if name == function and path.endswith("plan.py"))


def test_the_stream_crosses_ray_data_datasets_without_replaying_the_plan(tmp_path, tiny_model, prepared_sources,
                                                                       ray_local):
    job = parse_job(tiny_job_tree(str(tmp_path), tiny_model, prepared_sources, train={"max_steps": 7}))
    manifests = read_manifests(job)
    spec = make_spec(job, manifests, None, rank=1, world_size=2, vocab_size=1 << 20)
    reference = build_plan(spec)
    expected = [worker_slice(reference.next_batch(), 1, 2) for _ in range(7)]

    # Resume at step 2 (the position a checkpoint holds), 3 steps per dataset: datasets start at 2, 5.
    at_2 = build_plan(spec)
    at_2.skip_to(2)
    stream = DataStream(spec, end_step=7, prefetch_batches=2, reader_cpus=0.25, steps_per_dataset=3)
    stream.load_state_dict(at_2.state.state_dict())
    stream.start()  # as the loop does: the reader starts before the step-0 evaluation
    profile = cProfile.Profile()
    got = []
    for _ in range(5):
        profile.enable()
        _, sample_ids = stream.next()
        profile.disable()
        got.append(sample_ids)
    stream.close()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected[2:])), "the stream read other samples"
    assert stream.state_dict() == reference.state.state_dict()
    assert stream.tokens_per_source() == reference.tokens_per_source(job.data.seq_len)
    # In the training process: one cheap advance per step; no sample ids built, no plan replayed
    # (before, each new dataset replayed up to 10,000 steps and every step built a full batch).
    assert calls_in_this_process(profile, "advance") == 5
    assert calls_in_this_process(profile, "next_batch") == 0
    assert calls_in_this_process(profile, "row_at") == 0


def test_advance_moves_the_plan_exactly_as_next_batch_does(tmp_path, tiny_model, prepared_sources):
    tree = tiny_job_tree(str(tmp_path), tiny_model, prepared_sources,
                         data={"phases": [{"start_step": 3, "weights": {"code": 0.5, "english": 0.5}}]})
    job = parse_job(tree)
    spec = make_spec(job, read_manifests(job), None, rank=0, world_size=1, vocab_size=1 << 20)
    drawn, counted = build_plan(spec), build_plan(spec)
    for _ in range(40):  # past the phase change and several epochs of the small english source
        drawn.next_batch()
        counted.advance()
        assert counted.state == drawn.state


def test_a_started_stream_reads_what_a_lazy_one_reads_and_raises_its_readers_error(tmp_path, tiny_model,
                                                                                  prepared_sources):
    import shutil

    import pytest

    from raycpt.data.manifest import DataError

    job = parse_job(tiny_job_tree(str(tmp_path), tiny_model, prepared_sources, train={"max_steps": 6}))
    spec = make_spec(job, read_manifests(job), None, rank=0, world_size=1, vocab_size=1 << 20)
    lazy, started = DataStream(spec, end_step=6, local=True), DataStream(spec, end_step=6, local=True)
    started.start()
    for _ in range(6):
        assert np.array_equal(lazy.next()[1], started.next()[1])
    assert lazy.state_dict() == started.state_dict()
    started.close()

    # A shard the first batch needs is cut short: the background fetch's error reaches next().
    sources = {name: str(tmp_path / "copy" / name) for name in prepared_sources}
    for name, src in prepared_sources.items():
        shutil.copytree(src, sources[name])
        for shard in (tmp_path / "copy" / name / "train").glob("*.parquet"):
            shard.write_bytes(shard.read_bytes()[:100])
    broken = parse_job(tiny_job_tree(str(tmp_path / "b"), tiny_model, sources, train={"max_steps": 6}))
    stream = DataStream(make_spec(broken, read_manifests(broken), None, rank=0, world_size=1, vocab_size=1 << 20),
                        end_step=6, local=True)
    stream.start()
    with pytest.raises(DataError):
        stream.next()
    stream.close()
