"""Commit and fencing of checkpoints, on a 1-rank gloo group in this process (real DCP saves):
an async save commits at the first step boundary after it is durable, and an old attempt of a run
never commits into, or deletes from, the folder a newer attempt has claimed."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import one_rank_group
from raycpt import storage
from raycpt.checkpoint.attempt import AttemptFence, AttemptFenced, new_attempt_id
from raycpt.checkpoint.dcp import Checkpointer
from raycpt.checkpoint.layout import latest_committed, list_checkpoints, step_uri
from raycpt.checkpoint.state import TRAIN_STATE_VERSION, ResumeError, TrainState, read_train_state
from raycpt.errors import RaycptError


def state_at(step: int) -> TrainState:
    return TrainState(step=step, data={}, source_names=[], tokens_per_source={}, config={}, config_fingerprint="",
                      world_size=1, rng={}, versions={}, wall_time=0.0, reason="interval")


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_an_async_save_commits_at_the_first_step_boundary_after_it_is_durable(tmp_path):
    run = str(tmp_path / "run")
    with one_rank_group(str(tmp_path / "store")):
        model, optimizer = tiny()
        ckpt = Checkpointer(run, 0, keep_last=2, keep_every_steps=None, async_save=True, log=lambda m: None)
        ckpt.save(2, model, optimizer, state_at(2))
        ckpt.wait_durable()  # the upload is on storage; no later save comes
        assert latest_committed(run) is None, "durable is not yet committed: the marker goes last"
        assert ckpt.poll_commit() == 2  # the next step boundary commits it
        assert latest_committed(run).step == 2 and ckpt.last_committed_step == 2
        assert read_train_state(step_uri(run, 2)).step == 2
        assert ckpt.poll_commit() is None  # nothing in flight: no agreement needed
        ckpt.close()


def test_an_old_attempt_stops_before_it_writes_commits_or_deletes_in_a_newer_attempts_folder(tmp_path):
    run = str(tmp_path / "run")
    with one_rank_group(str(tmp_path / "store")):
        model, optimizer = tiny()
        old = AttemptFence(run, new_attempt_id())
        old.claim()
        old_sync = Checkpointer(run, 0, keep_last=1, keep_every_steps=None, async_save=False, log=lambda m: None,
                                fence=old)
        old_async = Checkpointer(run, 0, keep_last=1, keep_every_steps=None, async_save=True, log=lambda m: None,
                                 fence=old)
        old_sync.save(2, model, optimizer, state_at(2))
        old_async.save(4, model, optimizer, state_at(4))  # in flight when the newer attempt starts
        old_async.wait_durable()
        assert latest_committed(run).step == 2

        time.sleep(0.001)
        new = AttemptFence(run, new_attempt_id())
        new.claim()  # a newer attempt starts while the old one still runs
        with pytest.raises(AttemptFenced, match="commit step 4: a newer attempt") as e:
            old_async.poll_commit()
        assert isinstance(e.value, RaycptError) and new.attempt_id in str(e.value)
        with pytest.raises(AttemptFenced, match="write the shards of step 6"):
            old_sync.save(6, model, optimizer, state_at(6))
        assert [(c.step, c.committed) for c in list_checkpoints(run)] == [(2, True), (4, False)]

        # The newer attempt commits, and its retention removes the torn save the old one left.
        new_ckpt = Checkpointer(run, 0, keep_last=2, keep_every_steps=None, async_save=False, log=lambda m: None,
                                fence=new)
        new_ckpt.save(6, model, optimizer, state_at(6))
        assert [(c.step, c.committed) for c in list_checkpoints(run)] == [(2, True), (6, True)]
        # The old attempt may not delete either: its retention (keep_last 1) would remove step 2.
        with pytest.raises(AttemptFenced, match="delete"):
            old_sync.apply_retention()
        assert [c.step for c in list_checkpoints(run)] == [2, 6]


def test_a_train_state_of_a_newer_format_is_refused_with_the_fix(tmp_path):
    uri = str(tmp_path / "step-00000002")
    storage.write_json(storage.join(uri, "train_state.json"),
                       {**state_at(2).to_json(), "format_version": TRAIN_STATE_VERSION + 1})
    with pytest.raises(ResumeError, match="written by a newer raycpt .*upgrade raycpt"):
        read_train_state(uri)
    storage.write_json(storage.join(uri, "train_state.json"), {"format_version": 1, "step": 2})
    with pytest.raises(ResumeError, match="missing .*data"):
        read_train_state(uri)
    assert read_train_state.__module__ == "raycpt.checkpoint.state"
    storage.write_json(storage.join(uri, "train_state.json"), state_at(2).to_json())
    assert read_train_state(uri) == state_at(2)


def _load_with_a_peer_that_dies(rank: int, port: int, ckpt: str, results) -> None:
    """Rank 1 exits as SIGKILL would leave it; rank 0's DCP load meets the lost peer."""
    import datetime
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from raycpt.checkpoint.integrity import load_or_name_the_checkpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    if rank == 1:
        os._exit(9)
    state = {"w": torch.zeros(4)}
    try:
        load_or_name_the_checkpoint(lambda: dcp.load(state, checkpoint_id=ckpt), ckpt)
        results.put(("loaded", ""))
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        results.put((type(e).__name__, str(e)[:300]))
    results.close()
    results.join_thread()  # the queue's feeder thread must send before the process ends
    os._exit(0)


def test_a_load_cut_short_by_a_dead_peer_is_retried_not_called_damage(tmp_path):
    """Workers SIGKILLed while the group loads a resume checkpoint: the survivors' error must stay
    retryable (a CheckpointError would end the run over an intact checkpoint)."""
    import socket

    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp

    ckpt = str(tmp_path / "step")
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=ckpt, no_dist=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_load_with_a_peer_that_dies, args=(r, port, ckpt, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    kind, message = results.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert kind not in ("CheckpointError", "loaded"), (kind, message)


def test_a_load_that_fails_on_the_files_names_the_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    from raycpt.checkpoint.integrity import load_or_name_the_checkpoint
    from raycpt.checkpoint.metadata import CheckpointError

    ckpt = tmp_path / "step"
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(ckpt), no_dist=True)
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(CheckpointError, match=str(ckpt)):
        load_or_name_the_checkpoint(lambda: dcp.load({"w": torch.zeros(4)}, checkpoint_id=str(ckpt), no_dist=True),
                                    str(ckpt))
