"""Faults against a real local Ray: workers SIGKILLed at random moments, a worker killed in the
middle of a save, SIGTERM on a worker. Every run must end where the uninterrupted run ends:
the same steps, the same sample sequence and, on CPU with a fixed world size, bitwise the same
weights and optimizer state.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch

from conftest import run_logged, sample_log, tiny_job_tree
from raycpt import storage
from raycpt.checkpoint.layout import latest_committed, list_checkpoints, step_uri
from raycpt.config import parse_job

pytestmark = pytest.mark.slow


def saved_state(checkpoint_uri: str, tmp_path) -> dict:
    """A DCP checkpoint as one plain state dict (model and optimizer), read offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{abs(hash(checkpoint_uri))}.pt"
    dcp_to_torch_save(storage.local_path(checkpoint_uri), str(out))
    return torch.load(out, weights_only=False)


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: differs by up to {(a.float() - b.float()).abs().max().item()}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def starts(run_uri: str) -> list[dict]:
    folder = storage.join(run_uri, "metrics", "starts")
    return [storage.read_json(storage.join(folder, n)) for n in storage.list_dir(folder)]


def assert_ends_like_the_straight_run(run_uri: str, straight_uri: str, tmp_path) -> None:
    assert latest_committed(run_uri).step == 8
    straight = {s: ids for s, ids in sample_log(straight_uri).items() if s < 8}
    assert sample_log(run_uri) == straight, "the interrupted run trained a different sample sequence"
    assert_same_state(saved_state(step_uri(run_uri, 8), tmp_path), saved_state(step_uri(straight_uri, 8), tmp_path))
    mine = storage.read_json(storage.join(step_uri(run_uri, 8), "train_state.json"))
    ref = storage.read_json(storage.join(step_uri(straight_uri, 8), "train_state.json"))
    assert mine["data"] == ref["data"] and mine["tokens_per_source"] == ref["tokens_per_source"]


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes of this test session's Ray (children of its raylet)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = []
    for p in psutil.Process(raylet).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def job_like_the_straight_run(tmp_path, tiny_model, prepared_sources, name: str, **checkpoint) -> tuple[dict, str]:
    """The straight run's job under another name (and checkpoint settings): (job tree, run URI)."""
    tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, run={"name": name},
                         train={"max_steps": 8}, checkpoint=checkpoint)
    return tree, parse_job(tree).run_uri


def test_workers_sigkilled_at_random_moments_end_like_the_straight_run(straight_run, tmp_path, tiny_model,
                                                                         prepared_sources, ray_local):
    _, straight_uri = straight_run
    tree, run_uri = job_like_the_straight_run(tmp_path, tiny_model, prepared_sources, "sigkilled", max_failures=8)
    rng = random.Random(int(os.environ.get("RAYCPT_FAULT_SEED", "0")))
    kills: list[tuple[int, int | None]] = []
    done = threading.Event()

    def killer() -> None:
        # Three kills, each a random 0-5 s after the (re)started run recorded its start decision
        # (during the model build, the eval, a step or a save, wherever it lands); the second one
        # waits for a committed checkpoint first, so a resume from mid-run is always exercised.
        seen_starts = 0
        while len(kills) < 3 and not done.is_set():
            n = len(storage.list_dir(storage.join(run_uri, "metrics", "starts")))
            pids = train_worker_pids()
            if n == seen_starts or len(pids) < 2:
                time.sleep(0.2)
                continue
            seen_starts = n
            if len(kills) == 1:  # the second kill lands mid-run: after a checkpoint of this attempt
                while not done.is_set() and (latest_committed(run_uri) is None or latest_committed(run_uri).step < 2):
                    time.sleep(0.1)
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                time.sleep(rng.uniform(0.0, 5.0))
            if done.is_set():
                return
            victim = rng.choice(pids)
            entry = latest_committed(run_uri)
            try:
                os.kill(victim, signal.SIGKILL)
                kills.append((victim, entry.step if entry else None))
            except ProcessLookupError:
                pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = run_logged(tree)
    finally:
        done.set()
        thread.join()
    assert result.error is None, result.error
    assert kills, "no worker was killed"
    print(f"killed workers (pid, last committed step at the kill): {kills}")
    assert len(starts(run_uri)) >= 1 + len(kills)
    assert_ends_like_the_straight_run(run_uri, straight_uri, tmp_path)


def test_a_worker_killed_during_a_save_never_loads_the_torn_checkpoint(straight_run, tmp_path, tiny_model,
                                                                       prepared_sources, ray_local, capfd):
    _, straight_uri = straight_run
    tree, run_uri = job_like_the_straight_run(tmp_path, tiny_model, prepared_sources, "torn", max_failures=2)
    flag = tmp_path / "kill-once"
    flag.write_text("")
    # Rank 0 dies after every rank wrote its shards of step 4 and before the commit marker.
    result = run_logged(tree, kill_before_commit=[str(flag), 4])
    assert result.error is None, result.error
    assert not flag.exists(), "the fault was never injected"
    record = starts(run_uri)
    assert [(s["kind"], s["step"]) for s in record] == [("fresh_base", 0), ("resume", 2)], record
    assert all(e.committed for e in list_checkpoints(run_uri))
    assert_ends_like_the_straight_run(run_uri, straight_uri, tmp_path)
    # A correct resume reads as one: no traceback of Ray's (the PlacementGroupCleaner's) on the terminal.
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]


def test_a_worker_lost_between_a_saves_durability_and_the_next_save_resumes_from_that_save(
        straight_run, tmp_path, tiny_model, prepared_sources, ray_local):
    _, straight_uri = straight_run
    # max_failures -1: unlimited restarts (spot clusters) must train like any other setting.
    tree, run_uri = job_like_the_straight_run(tmp_path, tiny_model, prepared_sources, "lost-after-durable",
                                              interval_steps=4, max_failures=-1)
    flag = tmp_path / "kill-once"
    flag.write_text("")
    # Every rank waits at the end of step 5 until step 4's async save is durable; rank 0 is
    # SIGKILLed at the end of step 6, two steps before the next save (at 8) would have committed it.
    result = run_logged(tree, kill_after_durable=[str(flag), 5])
    assert result.error is None, result.error
    assert not flag.exists(), "the fault was never injected"
    record = starts(run_uri)
    assert [(s["kind"], s["step"]) for s in record] == [("fresh_base", 0), ("resume", 4)], record
    assert_ends_like_the_straight_run(run_uri, straight_uri, tmp_path)


def test_sigterm_on_a_worker_saves_at_the_next_step_then_the_resubmitted_run_finishes(
        straight_run, tmp_path, tiny_model, prepared_sources, ray_local):
    _, straight_uri = straight_run
    tree, run_uri = job_like_the_straight_run(tmp_path, tiny_model, prepared_sources, "sigtermed",
                                              interval_steps=4, max_failures=0)
    sent: list[int] = []

    def terminator() -> None:
        t0 = time.time()
        while time.time() - t0 < 300 and not sent:
            pids = train_worker_pids()
            if len(pids) == 2 and storage.list_dir(storage.join(run_uri, "metrics", "starts")):
                time.sleep(1.0)  # into the first steps
                os.kill(pids[1], signal.SIGTERM)
                sent.append(pids[1])
            time.sleep(0.2)

    thread = threading.Thread(target=terminator, daemon=True)
    thread.start()
    result = run_logged(tree)
    thread.join()
    assert sent and result.error is not None, "the SIGTERMed run should stop, not finish"
    assert "SIGTERM" in str(result.error) or "another worker" in str(result.error), result.error
    stopped = latest_committed(run_uri).step
    assert 0 < stopped < 8
    assert run_logged(tree).error is None
    assert [s["kind"] for s in starts(run_uri)] == ["fresh_base", "resume"]
    assert_ends_like_the_straight_run(run_uri, straight_uri, tmp_path)
