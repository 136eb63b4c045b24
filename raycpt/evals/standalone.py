"""`raycpt eval RUN|CHECKPOINT|HF_DIR`: the probes and tasks of training, on any model, in one process.

    raycpt eval <run>                          the run's newest committed checkpoint, its own eval sets
    raycpt eval <run>/checkpoints/step-00000040 --probe wiki=/data/wiki-probe --task cloze=tasks/c.jsonl
    raycpt eval ./exported-hf --job jobs/x.yaml  an exported (or the base) HF folder, the job's eval sets

What is evaluated: the eval section and sources of `--job`, else of the run's own config (for a
run or checkpoint), plus every `--probe NAME=PATH` (a prepared source) and `--task NAME=PATH`
(a multiple-choice jsonl). Checkpoints load with the export code (raycpt/checkpoint/export.py);
a LoRA run's adapters are merged. For a run or checkpoint the table also shows the change since
the run's step-0 evaluation (the base model), i.e. the forgetting.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from raycpt import storage
from raycpt.config import JobConfig, load_job, parse_job
from raycpt.data.manifest import DataError, Manifest, check_against_model, read_manifest, tokenizer_identity
from raycpt.errors import RaycptError
from raycpt.evals.tasks import Item, read_items
from raycpt.train.evaluate import Evaluator


class EvalError(RaycptError, ValueError):
    """`raycpt eval` cannot run as asked; the message names the argument to fix."""


@dataclass
class Target:
    model: torch.nn.Module
    tokenizer_dir: str
    kind: str                                 # checkpoint | hf
    step: int | None
    config: dict[str, Any] | None             # the run's job config (checkpoints)
    history: list[dict[str, Any]]             # the run's eval history (checkpoints)


def load_target(target: str, base: str | None = None) -> Target:
    """A run folder (its newest committed checkpoint), a checkpoint folder, or an HF folder."""
    from raycpt.checkpoint.export import load_checkpoint_model
    from raycpt.checkpoint.layout import checkpoint_uri_of

    if storage.exists(storage.join(target, "config.json")) and not storage.is_remote(target):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        return Target(model, target, "hf", None, None, [])
    if checkpoint_uri_of(target) is None:
        raise EvalError(f"{target}: neither an HF folder (config.json) nor a run or checkpoint folder with a "
                        "committed checkpoint")
    from raycpt.model.lora import merge_adapters

    loaded = load_checkpoint_model(target, base)
    if loaded.lora is not None:
        merge_adapters(loaded.model)
    if getattr(loaded.model.config, "tie_word_embeddings", False):
        loaded.model.tie_weights()
    return Target(loaded.model, loaded.base, "checkpoint", loaded.entry.step, loaded.state.config,
                  loaded.state.eval_history or [])


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"{flag} {item!r}: expected NAME=PATH")
        out.append((name, path))
    return out


def build_evaluator(target: Target, job: JobConfig | None, probes: list[str], tasks: list[str], tokenizer: Any,
                    max_rows: int | None, batch_size: int | None, seq_len: int | None,
                    device: torch.device) -> Evaluator:
    """The eval sets of the job (or the run's config) plus the command line's, checked against
    the model's tokenizer."""
    if job is None and target.config is not None:
        job = parse_job(target.config)
    tok_id = tokenizer_identity(tokenizer, os.path.basename(target.tokenizer_dir.rstrip("/")))
    vocab = int(target.model.config.vocab_size)
    sources: list[tuple[str, str, Manifest]] = []
    probe_sets: list[tuple[str, str, str]] = []    # (name, path, key)
    task_sets: list[tuple[str, list[Item]]] = []
    if job is not None:
        sources = [(s.name, s.role, read_manifest(s.path, f"data.sources[{i}].path", for_training=False))
                   for i, s in enumerate(job.data.sources)]
        probe_sets = [(p.name, p.path, f"eval.probes[{i}].path") for i, p in enumerate(job.eval.probes)]
        task_sets = [(t.name, read_items(t.path, f"eval.tasks[{i}].path", t.max_items))
                     for i, t in enumerate(job.eval.tasks)]
    names = {n for n, _, _ in sources}
    for name, path in _pairs(probes, "--probe"):
        if name in names:
            raise EvalError(f"--probe {name}={path}: {name!r} is a source of the job; give the probe another name")
        probe_sets = [p for p in probe_sets if p[0] != name] + [(name, path, f"--probe {name}")]
    for name, path in _pairs(tasks, "--task"):
        task_sets = [t for t in task_sets if t[0] != name] + [(name, read_items(path, f"--task {name}"))]
    probe_manifests = [(n, read_manifest(p, key, for_training=False), key) for n, p, key in probe_sets]
    if not sources and not probe_manifests and not task_sets:
        raise EvalError("nothing to evaluate: give --job, --probe NAME=PATH or --task NAME=PATH "
                        "(an HF folder has no eval sets of its own)")
    seq_len = seq_len or (job.data.seq_len if job else None)
    problems = []
    for name, _, m in sources:
        problems += check_against_model(m, f"source {name}", seq_len or m.seq_len, tok_id, vocab)
    for _, m, key in probe_manifests:
        problems += check_against_model(m, key, seq_len or m.seq_len, tok_id, vocab)
    if problems:
        raise DataError("the eval sets do not fit the model:\n  " + "\n  ".join(problems))
    seq_len = seq_len or next((m.seq_len for _, m, _ in probe_manifests), None) or 2048
    return Evaluator(sources, [(n, m) for n, m, _ in probe_manifests], task_sets, tokenizer,
                     max_rows=max_rows or (job.eval.max_rows if job else 64), seq_len=seq_len,
                     batch_size=batch_size or (job.train.micro_batch_size if job else 4), tasks_at="every_eval",
                     rank=0, world=1, device=device)


def run_eval(target: str, job_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
             probes: list[str] | tuple[str, ...] = (), tasks: list[str] | tuple[str, ...] = (),
             max_rows: int | None = None, batch_size: int | None = None, seq_len: int | None = None,
             device: str | None = None, base: str | None = None) -> dict[str, Any]:
    """Evaluate and return {target, kind, step, record, baseline}."""
    from transformers import AutoTokenizer

    job = load_job(job_path, overrides) if job_path else None
    if job is not None:
        storage.configure_storage(job.run.s3_endpoint_url)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = load_target(target, base)
    tokenizer = AutoTokenizer.from_pretrained(t.tokenizer_dir)
    evaluator = build_evaluator(t, job, list(probes), list(tasks), tokenizer, max_rows, batch_size, seq_len, dev)
    model = t.model.to(dev).eval()
    record = evaluator.evaluate(model, t.step or 0)
    baseline = t.history[0] if t.history else None
    return {"target": target, "kind": t.kind, "step": t.step, "record": record, "baseline": baseline,
            "roles": evaluator.roles}


def format_table(result: dict[str, Any]) -> str:
    """One line per source, probe and task; changes against the run's step 0 where it has one."""
    rec, base = result["record"], result["baseline"] or {}
    where = f"step {result['step']}" if result["step"] is not None else "HF folder"
    lines = [f"eval {result['target']} ({where})",
             f"  {'set':<20} {'kind':<8} {'loss':>8} {'ppl':>9} {'acc':>6} {'acc_norm':>8}   vs step 0"]
    for field, kind_of in (("loss", lambda n: result["roles"].get(n, "source")), ("probe_loss", lambda n: "probe")):
        for name, loss in rec.get(field, {}).items():
            b = base.get(field, {}).get(name)
            change = f"{loss - b:+.4f} ({100 * (loss - b) / b:+.1f}%)" if b else "-"
            lines.append(f"  {name:<20} {kind_of(name):<8} {loss:>8.4f} {torch.tensor(loss).exp().item():>9.2f} "
                         f"{'':>6} {'':>8}   {change}")
    for name, tk in rec.get("tasks", {}).items():
        b = base.get("tasks", {}).get(name)
        change = f"acc {tk['acc'] - b['acc']:+.3f}, acc_norm {tk['acc_norm'] - b['acc_norm']:+.3f}" if b else "-"
        lines.append(f"  {name:<20} {'task':<8} {'':>8} {'':>9} {tk['acc']:>6.3f} {tk['acc_norm']:>8.3f}   {change}"
                     f"  ({tk['items']} items, chance {tk['chance']:.3f})")
    return "\n".join(lines)


def eval_command(a) -> int:
    result = run_eval(a.target, a.job, a.overrides, a.probe or [], a.task or [], a.max_rows, a.batch_size,
                      a.seq_len, a.device, a.base)
    print(json.dumps(result, indent=1) if a.json else format_table(result))
    return 0
