"""Real 2-worker training on a local Ray (gloo, FSDP2, DCP): checkpoints, kill, resume, resize.

The sample ids trained at every step are logged; a run that is killed and resumed, and resumed
again on another number of workers, must train exactly the sequence an uninterrupted run trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import cpu_sharded_model, one_rank_group, run_logged, sample_log, tiny_job_tree
from raycpt import storage
from raycpt.checkpoint.layout import latest_committed, list_checkpoints
from raycpt.config import parse_job

pytestmark = pytest.mark.slow


def run(tree: dict, **loop):
    return run_logged(tree, **loop)


@pytest.fixture(scope="module")
def uninterrupted(straight_run):
    return straight_run


def test_uninterrupted_run_checkpoints_and_reports(uninterrupted):
    tree, run_uri = uninterrupted
    entries = list_checkpoints(run_uri)
    assert [e.step for e in entries if e.committed] == [6, 8]  # keep_last=2, older ones deleted
    assert all(e.committed for e in entries)
    state = storage.read_json(storage.join(latest_committed(run_uri).uri, "train_state.json"))
    assert state["step"] == 8 and state["world_size"] == 2
    tokens = state["tokens_per_source"]
    assert sum(tokens.values()) == 8 * 8 * 64
    assert tokens["english"] == 8 * 2 * 64  # replay_ratio 0.25 of every batch, exactly
    history = state["eval_history"]
    assert [h["step"] for h in history] == [0, 8]
    # A random tiny model over 8 steps need not improve on held-out code; it must have changed.
    assert all(0 < v < 20 for h in history for v in h["loss"].values())
    assert history[-1]["loss"]["code"] != history[0]["loss"]["code"]
    log = sample_log(run_uri)
    assert sorted(log) == list(range(8))
    ids = [i for s in range(8) for i in log[s]]
    assert len(ids) == len(set(ids)), "a sample repeated inside the first epoch"


def test_status_json_shows_step_and_tokens(uninterrupted, capsys):
    from raycpt.cli import main

    _, run_uri = uninterrupted
    assert main(["status", run_uri, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["latest_step"] == 8
    assert st["tokens_per_source"]["code"] == 8 * 6 * 64
    assert set(st["last_eval"]["loss"]) == {"code", "english"}


def _wait_for_commit(run_uri: str, min_step: int, proc: subprocess.Popen, timeout_s: float) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        entry = latest_committed(run_uri)
        if entry is not None and entry.step >= min_step:
            return entry.step
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint committed in time")


def test_killed_driver_then_resume_on_1_then_2_workers_trains_the_same_sequence(
        uninterrupted, tmp_path, tiny_model, prepared_sources, ray_local):
    _, straight_uri = uninterrupted
    store = str(tmp_path / "runs")
    tree = tiny_job_tree(store, tiny_model, prepared_sources, run={"name": "interrupted"},
                         train={"max_steps": 8})
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump({**tree, "train": {**tree["train"], "log_sample_ids": True}}))
    run_uri = parse_job(tree).run_uri

    # 1. `raycpt train` as its own driver process on the same Ray cluster, SIGKILLed mid-run.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raycpt.cli", "train", str(job_yaml)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = _wait_for_commit(run_uri, 2, proc, timeout_s=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at < 8, "the run finished before it could be killed"
    time.sleep(2)  # let Ray tear down the dead driver's workers

    # 2. Resubmitted on 1 worker (global batch kept by accumulation), stopping at step 6.
    one = {**tree, "scaling": {"num_workers": 1}, "train": {**tree["train"], "max_steps": 6}}
    assert run(one).error is None
    assert latest_committed(run_uri).step == 6

    # 3. And on 2 workers again, to the end.
    assert run(tree).error is None
    state = storage.read_json(storage.join(latest_committed(run_uri).uri, "train_state.json"))
    assert state["step"] == 8 and state["world_size"] == 2

    straight, resumed = sample_log(straight_uri), sample_log(run_uri)
    assert sorted(resumed) == list(range(8)), "a step is missing from the resumed run"
    assert resumed == straight, "the resumed run trained a different sample sequence"
    straight_state = storage.read_json(storage.join(latest_committed(straight_uri).uri, "train_state.json"))
    assert state["tokens_per_source"] == straight_state["tokens_per_source"]
    assert state["data"] == straight_state["data"]


def test_changed_data_config_is_refused_unless_marked_intended(uninterrupted):
    tree, run_uri = uninterrupted
    changed = {**tree, "data": {**tree["data"], "replay_ratio": 0.5}, "train": {**tree["train"], "max_steps": 10}}
    from raycpt.checkpoint.resume import ResumeError

    with pytest.raises(ResumeError, match=r"data.replay_ratio: 0.25 -> 0.5"):  # refused before any worker starts
        run(changed)
    assert latest_committed(run_uri).step == 8  # nothing lost

    allowed = {**changed, "resume": {"allow_changes": ["data.replay_ratio"]}}
    assert run(allowed).error is None
    state = storage.read_json(storage.join(latest_committed(run_uri).uri, "train_state.json"))
    assert state["step"] == 10
    # The new blend applies from step 8: half of the 2 new batches (8 slots each) is replay.
    assert state["tokens_per_source"]["english"] == (8 * 2 + 2 * 4) * 64


def test_export_gives_an_hf_folder_with_the_trained_logits(uninterrupted, tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycpt.checkpoint.dcp import load_sharded
    from raycpt.checkpoint.export import export_hf

    _, run_uri = uninterrupted
    out = export_hf(run_uri, str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token_id is not None
    x = torch.randint(0, 1000, (2, 24))

    # The training code path: meta build, FSDP2, DCP load of the same checkpoint (1 rank).
    with one_rank_group(str(tmp_path / "store")):
        model = cpu_sharded_model(tiny_model, weights_from=None)
        load_sharded(latest_committed(run_uri).uri, model, None)
        with torch.no_grad():
            trained = model(input_ids=x).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=x).logits
    with torch.no_grad():
        got = exported(input_ids=x).logits
    assert torch.allclose(got, trained, atol=1e-5), (got - trained).abs().max()
    assert not torch.allclose(got, base, atol=1e-3), "export returned the base weights, not the trained ones"
