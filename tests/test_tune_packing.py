"""Sweeps at the concurrency the user has: several trials sharing resources, synchronous
successive halving stopping trials that run one at a time, the GPU share's memory check, the
Optuna search, and the compute-share figure of `raycpt bench tune` on known numbers.
"""

from __future__ import annotations

import pytest

from conftest import tiny_job_tree
from raycpt import storage
from raycpt.bench.tune import rung_arrivals, startup_spans
from raycpt.checkpoint.layout import latest_committed
from raycpt.config import ConfigError
from raycpt.tune.config import parse_sweep
from raycpt.tune.resources import (
    CONTEXT_OVERHEAD_BYTES,
    GIB,
    check_share_fits,
    compute_share,
    job_training_memory,
    training_memory,
)
from raycpt.tune.schedulers import choose_kind, rung_steps

# ---------------------------------------------------------------------------------------------
# Pure parts


def test_rungs_and_the_scheduler_chosen_by_concurrency():
    assert rung_steps(25, 4, 400, 25) == [25, 100]          # 400/16, 400/4
    assert rung_steps(50, 3, 300, 50) == [100]              # 300/9 = 33 is under the grace period
    assert rung_steps(20, 3, 180, 25) == [50]               # 180/3 = 60 -> the evaluation at 50; 20 -> none
    assert rung_steps(4, 3, 8, 4) == [4]                    # budget under factor x grace: one rung at grace
    # Few at once: synchronous halving; many at once and many more trials than that: ASHA.
    assert choose_kind("auto", 1, 8, 3, 8) == "hyperband"
    assert choose_kind("auto", 4, 8, 3, 8) == "hyperband"
    assert choose_kind("auto", 16, 30, 3, 8) == "hyperband"  # 30 trials < 3 x 16 at once
    assert choose_kind("auto", 16, 100, 3, 8) == "asha"
    assert choose_kind("asha", 1, 8, 3, 8) == "asha"       # an explicit kind stays


def test_training_memory_on_known_numbers():
    m = training_memory(1000, num_layers=2, hidden_size=8, intermediate_size=16, vocab_size=32, micro_batch_size=2,
                        seq_len=4, bf16=True, activation_checkpointing=False, loss_chunk_tokens=0)
    # 8 tokens x 2 blocks x 2 bytes x (8*8 + 4*16); one loss chunk of 8 tokens x 32 x (2 + 4 + 4) bytes
    assert (m.weights_bytes, m.grads_bytes, m.optimizer_bytes) == (6000, 4000, 8000)
    assert m.activations_bytes == 8 * 2 * 2 * (64 + 64) and m.loss_bytes == 8 * 32 * 10
    assert m.total_bytes == int((6000 + 4000 + 8000 + 4096 + 2560) * 1.15) + CONTEXT_OVERHEAD_BYTES
    ckpt = training_memory(1000, 2, 8, 16, 32, 2, 4, bf16=True, activation_checkpointing=True, loss_chunk_tokens=0)
    assert ckpt.activations_bytes == 8 * (2 * 2 * 8 + 2 * (64 + 64))  # block inputs + one block rebuilt


def test_gpu_share_check_names_the_key(tmp_path):
    from raycpt.model.shapes import llama_config

    tree = tiny_job_tree(str(tmp_path), "/models/smollm2", {"code": "/d/c", "english": "/d/e"},
                         data={"seq_len": 2048}, train={"micro_batch_size": 8, "global_batch_size": 16},
                         scaling={"num_workers": 1, "use_gpu": True})
    from raycpt.config import parse_job

    estimate = job_training_memory(parse_job(tree), llama_config("smollm2-135m"))
    assert 130e6 < estimate.params < 140e6
    assert 10 * GIB < estimate.total_bytes < 30 * GIB  # activations of 16k tokens dominate
    check_share_fits(estimate, 0.25, 141 * GIB, "NVIDIA H200")  # 4 trials a GPU: 35 GiB each
    with pytest.raises(ConfigError, match=r"tune.gpus_per_trial: 0.1 of NVIDIA H100 \(80 GiB\) is 8.0 GiB.*"
                                          r"raise it to at least 0\.\d+"):
        check_share_fits(estimate, 0.1, 80 * GIB, "NVIDIA H100")


def test_compute_share_on_known_numbers():
    share = compute_share({"trial_steps": 650, "gpu_seconds": 300.0, "wall_s": 200.0},
                          {"trial_steps": 3200, "gpu_seconds": 1200.0, "wall_s": 400.0})
    assert share == {"trial_steps": pytest.approx(0.203125), "gpu_seconds": 0.25, "wall_s": 0.5}


def test_rung_arrivals_on_known_timelines(tmp_path):
    """The bench's view of a rung: when its trials reached it and when the first was let on. A
    trial that was paused or stopped at the rung never marks `rung_passed`."""
    import json

    marks = {"a": [("trial_start", None, 100.0), ("rung_reached", 25, 160.0), ("rung_passed", 25, 230.0),
                   ("rung_reached", 100, 300.0)],
             "b": [("trial_start", None, 100.0), ("rung_reached", 25, 225.0)],  # stopped at the rung
             "c": [("trial_start", None, 101.0), ("rung_reached", 25, 190.0), ("rung_passed", 25, 231.0),
                   ("rung_reached", 100, 310.0), ("rung_passed", 100, 312.0)]}
    for trial, events in marks.items():
        with open(tmp_path / f"{trial}.jsonl", "w") as f:
            f.writelines(json.dumps({"event": e, "step": st, "time": t}) + "\n" for e, st, t in events)
    assert rung_arrivals(str(tmp_path), since=100.0) == {
        25: {"trials": 3, "first_s": 60.0, "last_s": 125.0, "spread_s": 65.0, "first_let_on_s": 130.0},
        100: {"trials": 2, "first_s": 200.0, "last_s": 210.0, "spread_s": 10.0, "first_let_on_s": 212.0}}
    assert rung_arrivals(str(tmp_path / "none"), since=0.0) == {}


def _tree(tmp_path, scaling=None, **tune):
    tree = tiny_job_tree(str(tmp_path / "runs"), "/models/tiny", {"code": "/data/code", "english": "/data/en"},
                         eval={"interval_steps": 2, "max_rows": 4}, scaling=scaling or {"num_workers": 1})
    tree["tune"] = {"space": {"optim.peak_lr": {"loguniform": [1e-5, 1e-2]}}, **tune}
    return tree


def test_the_shipped_one_gpu_sweep_is_the_measured_bench_sweep(tmp_path):
    """jobs/sweep-smollm2-one-gpu.yaml is the sweep that `raycpt bench tune` ran on the H200
    (docs/deploying.md, section 10): the same job and tune sections, paths aside, under today's
    defaults (the run had early_budget pro_rata) and with `search: grid` spelled out (the bench's
    random search enumerates the same nine grid points)."""
    from pathlib import Path

    from raycpt.bench.tune import TuneBenchOptions, sweep_tree
    from raycpt.tune.config import load_sweep

    shipped_job, shipped = load_sweep(Path(__file__).resolve().parents[1] / "jobs" / "sweep-smollm2-one-gpu.yaml")
    s = "/data/raycpt/shards"
    overrides = [
        "model.compile=true", "tune.evaluate_job_config=false", "tune.search=grid",
        "tune.space={optim.peak_lr: {grid: [1.0e-4, 3.0e-4, 9.0e-4]}, data.replay_ratio: {grid: [0.0, 0.1, 0.3]}}",
        f"data.sources=[{{name: german, path: {s}/german, role: new}}, "
        f"{{name: english, path: {s}/english, role: replay}}]",
        f"eval.probes=[{{name: pydoc, path: {s}/probe-pydoc}}, {{name: code, path: {s}/probe-code}}]",
        "tune.objective={forgetting_budget: 0.25, relative: true, over: [probes, replay]}",
        "scaling.cpus_per_worker=0.5", "data.reader_cpus=0.1", "tune.trial_driver_resources={CPU: 0.05}"]
    o = TuneBenchOptions(workdir=str(tmp_path), trials=2, trials_per_gpu=9, steps=1000, eval_every=50, grace_steps=50,
                         reduction_factor=4, micro_batch_size=8, eval_rows=48, overrides=overrides)
    bench_job, bench = parse_sweep(sweep_tree(o, "/data/models/smollm2-135m", "", "", "early", 9), tmp_path)
    assert shipped.gpus_per_trial == pytest.approx(bench.gpus_per_trial, abs=1e-4)
    for section in ("space", "search", "num_samples", "evaluate_job_config", "scheduler", "objective",
                    "trial_driver_resources"):
        assert getattr(shipped, section) == getattr(bench, section), section
    for section in ("model", "data", "train", "optim", "scaling", "eval"):
        assert getattr(shipped_job, section) == getattr(bench_job, section), section


def test_share_and_search_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_sweep(_tree(tmp_path, gpus_per_trial=0.25, search="grid"), tmp_path)
    msg = str(e.value)
    assert "tune.gpus_per_trial: needs scaling.use_gpu=true" in msg
    assert "tune.space.optim.peak_lr: tune.search=grid needs grid or choice values" in msg
    with pytest.raises(ConfigError, match=r"tune.gpus_per_trial: 0.5 needs scaling.num_workers=1"):
        parse_sweep(_tree(tmp_path, scaling={"num_workers": 2, "use_gpu": True}, gpus_per_trial=0.5), tmp_path)
    with pytest.raises(ConfigError, match="tune.gpus_per_trial: "):
        parse_sweep(_tree(tmp_path, gpus_per_trial=1.5), tmp_path)
    with pytest.raises(ConfigError, match="tune.space.data.replay_ratio: tune.search=optuna draws every key"):
        parse_sweep(_tree(tmp_path, search="optuna", space={"data.replay_ratio": {"grid": [0.1, 0.2]}}), tmp_path)
    _, tune = parse_sweep(_tree(tmp_path, scaling={"num_workers": 1, "use_gpu": True}, gpus_per_trial=0.25,
                                  search="optuna"), tmp_path)
    assert tune.gpus_per_trial == 0.25 and tune.search == "optuna"


def test_optuna_search_starts_from_the_job_config_then_draws_in_bounds(tmp_path):
    pytest.importorskip("optuna")
    from raycpt.tune.sweep import build_search_alg

    _, tune = parse_sweep(_tree(tmp_path, search="optuna", seed=3,
                                  space={"optim.peak_lr": {"loguniform": [1e-5, 1e-2]},
                                         "data.replay_ratio": {"choice": [0.1, 0.3]}}), tmp_path)
    import ray.tune

    space = {"optim.peak_lr": ray.tune.loguniform(1e-5, 1e-2), "data.replay_ratio": ray.tune.choice([0.1, 0.3])}
    limiter = build_search_alg(tune, [{"optim.peak_lr": 1e-3, "data.replay_ratio": 0.3}], 2, None)
    assert limiter.set_search_properties("objective", "min", space)
    first = limiter.suggest("a")
    assert first == {"optim.peak_lr": 1e-3, "data.replay_ratio": 0.3}
    drawn = limiter.suggest("b")
    assert 1e-5 <= drawn["optim.peak_lr"] <= 1e-2 and drawn["data.replay_ratio"] in (0.1, 0.3)
    assert limiter.suggest("c") is None  # 2 at a time
    limiter.on_trial_complete("a", {"objective": 2.0, "step": 8})
    assert limiter.suggest("c") is not None


# ---------------------------------------------------------------------------------------------
# Real sweeps on the local Ray


def _sweep(tmp_path, tiny_model, prepared_sources, name: str, **tune):
    """Trials of 1 CPU worker, 8 steps of 4 sequences, an evaluation every 4; the job's own LR
    (1e-2) teaches the tiny model much faster than the sampled ones (1e-6..1e-5)."""
    tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, prepared_sources,
                         train={"global_batch_size": 4, "max_steps": 8, "log_interval_steps": 4},
                         optim={"peak_lr": 1e-2, "warmup_steps": 1}, scaling={"num_workers": 1},
                         checkpoint={"interval_steps": 8, "keep_last": 1}, eval={"interval_steps": 4, "max_rows": 4},
                         metrics={"tensorboard": False})
    tree["tune"] = {"name": name, "space": {"optim.peak_lr": {"loguniform": [1e-6, 1e-5]}},
                    "num_samples": 2, "max_steps_per_trial": 8, **tune}
    return parse_sweep(tree, tmp_path)


@pytest.mark.slow
def test_sync_halving_pauses_trials_at_the_rung_to_free_slots_for_queued_ones(tmp_path, tiny_model,
                                                                              prepared_sources, ray_local):
    """3 trials, 2 at a time (workers of half a CPU, so both train at once), a rung at step 4
    keeping 1 of 3: ASHA would promote whichever trial reached the rung first. Synchronous halving
    stops each trial at the rung: the first there is paused so that the queued third can start;
    the second finds nobody waiting for its slot and trains on; the rung judges all three together
    (a trial that trained on and finished included), stops the rest at step 4 and resumes the
    best from its rung checkpoint if it was the paused one."""
    from raycpt.train.rung_wait import allowance_uri
    from raycpt.tune.results import ALLOWANCES_FOLDER
    from raycpt.tune.sweep import run_sweep

    job, tune = _sweep(tmp_path, tiny_model, prepared_sources, "sync-sweep", max_concurrent_trials=2,
                       scheduler={"kind": "auto", "grace_period_steps": 4, "reduction_factor": 3})
    job = job.model_copy(update={"scaling": job.scaling.model_copy(update={"cpus_per_worker": 0.5})})
    out = run_sweep(job, tune, loop_options={"local_stream": True, "timeline_dir": str(tmp_path / "timelines")})
    assert out["scheduler"] == "hyperband" and out["errors"] == 0
    trials = out["trials"]
    best = next(t for t in trials if t["trial_id"] == out["best_trial"])
    assert best["baseline"] and best["status"] == "done" and best["steps"] == 8
    # The winner either trained on past the rung or was paused there and resumed from its step-4
    # checkpoint; either way no step twice.
    run_uri = storage.join(out["uri"], "runs", best["run_name"])
    starts_uri = storage.join(run_uri, "metrics", "starts")
    starts = [storage.read_json(storage.join(starts_uri, n)) for n in sorted(storage.list_dir(starts_uri))]
    assert [(s["kind"], s["step"]) for s in starts] in ([("fresh_base", 0)], [("fresh_base", 0), ("resume", 4)])
    history = storage.read_json(storage.join(run_uri, "metrics", "eval.json"))
    assert [h["step"] for h in history] == [0, 4, 8]
    winner_trained_on = len(starts) == 1
    # Stopped trials trained to the rung and not a step past it; with the winner the one that
    # trained on, that is 1 x 8 + 2 x 4 of the 24 trial-steps, else the other trained on to its end.
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert all(t["steps"] == 4 for t in stopped), trials
    # Their checkpoint is the rung's own save (the job's interval is 8: no other save before it).
    for t in stopped:
        ckpt = latest_committed(storage.join(out["uri"], "runs", t["run_name"]))
        state = storage.read_json(storage.join(ckpt.uri, "train_state.json"))
        assert (ckpt.step, state["reason"]) == (4, "rung"), (t["trial_id"], ckpt.step, state["reason"])
    c = out["compute"]
    assert c["steps_if_all_ran_to_the_end"] == 24
    assert len(stopped) == c["stopped_early"] == (2 if winner_trained_on else 1), trials
    assert c["steps_trained"] == (16 if winner_trained_on else 20), trials
    # What the scheduler let each trial train to: the stopped ones never past the rung.
    for t in trials:
        allowed = storage.read_json(allowance_uri(storage.join(out["uri"], ALLOWANCES_FOLDER), t["trial_id"]))
        assert allowed["train_to"] == (4 if t in stopped else None), (t["trial_id"], allowed)
    # The first two trained at the same time; the third started once a paused one gave its slot back.
    spans = sorted(startup_spans(str(tmp_path / "timelines")))
    assert len(spans) == 2 + len(starts), spans
    first, second, third = spans[:3]
    assert second[0] < first[1] and first[0] < second[1], f"the first two did not overlap: {spans}"
    assert third[0] > max(first[1], second[1]), spans
    # Every trial marked its arrival at the rung once (the resumed one starts past it).
    assert rung_arrivals(str(tmp_path / "timelines"), since=0.0)[4]["trials"] == 3


def test_a_trial_waits_at_a_rung_until_the_sweep_allows_it_on(tmp_path):
    """The workers' side of the rung wait: nothing past a rung without an allowance above it."""
    import threading
    import time

    from raycpt.train.rung_wait import RungWait, may_pass, write_allowance

    uri = str(tmp_path / "allow" / "t1.json")
    wait = RungWait(rungs=(4, 12), allowance_uri=uri, poll_s=0.05)
    committed, said = [], []
    wait.hold(3, 0, lambda: committed.append(3), lambda flag: flag, said.append)  # not a rung
    assert committed == [] and said == []
    assert not may_pass(uri, 4)
    write_allowance(uri, 4)  # "stop at 4": waiting there goes on
    assert not may_pass(uri, 4) and may_pass(uri, 3)
    timer = threading.Timer(0.5, write_allowance, (uri, 12))
    t0 = time.time()
    timer.start()
    wait.hold(4, 0, lambda: committed.append(4), lambda flag: flag, said.append)
    assert committed == [4] and time.time() - t0 >= 0.5 and "train on after" in said[-1]
    write_allowance(uri, None)  # past the last rung: to the budget
    assert may_pass(uri, 12) and may_pass(uri, 10_000)
    late = RungWait(rungs=(20,), allowance_uri=str(tmp_path / "never.json"), poll_s=0.05, max_wait_s=0.2)
    late.hold(20, 0, lambda: None, lambda flag: flag, said.append)
    assert "no verdict" in said[-1]


class _Controller:
    """What the scheduler reads of Tune's controller: the trials, whether the search is done, stops."""

    def __init__(self, trials):
        from types import SimpleNamespace

        self.trials = trials
        self.search_alg = SimpleNamespace(is_finished=lambda: True, total_samples=len(trials))

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        from ray.tune.experiment import Trial

        trial.status = Trial.TERMINATED


def _halving(tmp_path, train_on_while_waiting: bool):
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from raycpt.tune.schedulers import SyncSuccessiveHalving, TrialGate

    trials = [SimpleNamespace(trial_id=t, status=Trial.RUNNING) for t in ("a", "b", "c")]
    controller = _Controller(trials)
    sched = SyncSuccessiveHalving([25, 100], 3, TrialGate(3), metric="objective", mode="min",
                                  log=lambda m: None, allowances_uri=str(tmp_path / "allow"),
                                  train_on_while_waiting=train_on_while_waiting)
    for t in trials:
        sched.on_trial_add(controller, t)
    return sched, controller, {t.trial_id: t for t in trials}


def _allowed(tmp_path, tid: str):
    from raycpt.train.rung_wait import allowance_uri

    return storage.read_json(allowance_uri(str(tmp_path / "allow"), tid))["train_to"]


def test_a_trial_waiting_for_its_verdict_trains_on_at_most_one_rung(tmp_path):
    """3 trials, rungs at 25 and 100, nobody waiting for a slot: the first at the rung trains on,
    but only to the next rung while the first rung is undecided (before, its allowance at step 100
    was the whole budget); once promoted it goes on to its budget, and the others are stopped."""
    sched, controller, trials = _halving(tmp_path, train_on_while_waiting=True)
    for tid in "abc":
        sched.on_trial_result(controller, trials[tid], {"step": 0, "objective": 3.0})
        assert _allowed(tmp_path, tid) == 25
    assert sched.on_trial_result(controller, trials["a"], {"step": 25, "objective": 1.0}) == "CONTINUE"
    assert _allowed(tmp_path, "a") == 100
    sched.on_trial_result(controller, trials["a"], {"step": 100, "objective": 0.9})
    assert _allowed(tmp_path, "a") == 100, "trained past a rung whose verdict is still to come"
    sched.on_trial_result(controller, trials["b"], {"step": 25, "objective": 2.0})
    assert sched.on_trial_result(controller, trials["c"], {"step": 25, "objective": 2.5}) == "STOP"
    assert trials["b"].status == "TERMINATED" and _allowed(tmp_path, "b") == 100
    assert _allowed(tmp_path, "a") is None  # promoted, the only trial of the last rung: to its budget


def test_trials_sharing_a_gpu_wait_at_the_rung_for_its_verdict(tmp_path):
    """tune.gpus_per_trial < 1: a trial at a rung does not train on (it would take GPU time from
    the trials the rung waits for); the verdict lets the best on to the next rung and stops the rest."""
    sched, controller, trials = _halving(tmp_path, train_on_while_waiting=False)
    for tid in "abc":
        sched.on_trial_result(controller, trials[tid], {"step": 0, "objective": 3.0})
    sched.on_trial_result(controller, trials["a"], {"step": 25, "objective": 1.0})
    sched.on_trial_result(controller, trials["b"], {"step": 25, "objective": 2.0})
    assert _allowed(tmp_path, "a") == 25 and _allowed(tmp_path, "b") == 25  # both wait at the rung
    assert sched.on_trial_result(controller, trials["c"], {"step": 25, "objective": 2.5}) == "STOP"
    assert _allowed(tmp_path, "a") == 100 and trials["b"].status == "TERMINATED"  # on to the next rung
