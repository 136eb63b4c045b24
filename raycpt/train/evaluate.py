"""Evaluation during training: held-out loss per domain (the new domain shows adaptation, replay
domains show forgetting), probes (eval-only sets replay cannot hide forgetting on) and
multiple-choice tasks, all ranks together, at step 0 and every `eval.interval_steps`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raycpt.config import JobConfig
from raycpt.data.manifest import Manifest, read_manifest
from raycpt.data.stream import read_eval_rows
from raycpt.evals.tasks import Item, Request, accuracy, encode, loglikelihoods, read_items


@torch.no_grad()
def eval_losses(model: nn.Module, rows_by_source: dict[str, np.ndarray], rank: int, world: int,
                micro_batch_size: int, device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss per source over its held-out rows, all ranks together.

    Every rank runs the same number of forward passes (FSDP all-gathers in each), padding with
    zero-weight rows where the rows do not divide evenly.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, rows in rows_by_source.items():
        if len(rows) == 0:
            continue
        mine = rows[rank::world]
        n_batches = math.ceil(math.ceil(len(rows) / world) / micro_batch_size)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for b in range(n_batches):
            chunk = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
            weight = 1.0 if len(chunk) else 0.0
            if not len(chunk):
                chunk = rows[:1]
            x = torch.as_tensor(chunk, dtype=torch.long, device=device)
            loss = model(input_ids=x, labels=x).loss
            tokens = x.shape[0] * (x.shape[1] - 1)
            total[0] += weight * loss.double() * tokens
            total[1] += weight * tokens
        if dist.is_initialized():
            dist.all_reduce(total)
        out[name] = float(total[0] / total[1])
    model.train(was_training)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def forgetting(now: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Old-domain loss now minus at step 0 (positive: the model forgot)."""
    return {k: now[k] - baseline[k] for k in now if k in baseline}


def read_probe_rows(m: Manifest, max_rows: int) -> np.ndarray:
    """The first `max_rows` rows of a probe: its held-out rows, then (a source prepared for
    training can serve as a probe, since this job never trains on it) its training rows."""
    rows = read_eval_rows(m, max_rows)
    if len(rows) < max_rows and m.train.rows:
        rows = np.concatenate([rows, read_eval_rows(dataclasses.replace(m, eval=m.train), max_rows - len(rows))])
    return rows


def relative(now: float, base: float) -> float:
    return (now - base) / base if base else 0.0


class Evaluator:
    """Everything a run evaluates, and what it found so far.

    Held-out rows of every source (the new domain shows adaptation; replay sources show the
    forgetting replay is supposed to prevent), probe rows (`eval.probes`: never trained on, so
    replay cannot hide their forgetting) and multiple-choice tasks (`eval.tasks`). The history
    (one record per evaluation, the first at step 0 = the base model) is the train state's
    `eval_history`; forgetting is always measured against that first record.

    A record:
        {"step": 40,
         "loss": {source: loss}, "forgetting": {replay source: loss - step-0 loss},
         "probe_loss": {probe: loss}, "probe_forgetting": {probe: loss - step-0 loss},
         "relative_forgetting": {replay source or probe: (loss - step-0 loss) / step-0 loss},
         "tasks": {task: {"acc", "acc_norm", "items", "chance"}}}     # when tasks were scored
    """

    def __init__(self, sources: list[tuple[str, str, Manifest]], probes: list[tuple[str, Manifest]],
                 tasks: list[tuple[str, list[Item]]], tokenizer: Any, *, max_rows: int, seq_len: int,
                 batch_size: int, tasks_at: str, rank: int, world: int, device: torch.device):
        """`sources`: (name, role, manifest); `probes`: (name, manifest); `tasks`: (name, items);
        task requests are cut to `seq_len` tokens; `batch_size` sequences per forward pass."""
        self.rank, self.world, self.device = rank, world, device
        self.batch_size, self.tasks_at = batch_size, tasks_at
        self.roles = {name: role for name, role, _ in sources}
        self.source_rows = {name: read_eval_rows(m, max_rows) for name, _, m in sources}
        self.probe_rows = {name: read_probe_rows(m, max_rows) for name, m in probes}
        self.tasks: dict[str, tuple[list[Item], list[Request]]] = {
            name: (items, encode(items, tokenizer, seq_len)) for name, items in tasks}
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_job(cls, job: JobConfig, manifests: list[Manifest], tokenizer: Any, rank: int, world: int,
                 device: torch.device) -> "Evaluator":
        """The job's sources (their held-out rows), `eval.probes` and `eval.tasks`."""
        probes = [(p.name, read_manifest(p.path, f"eval.probes[{i}].path", for_training=False))
                  for i, p in enumerate(job.eval.probes)]
        tasks = [(t.name, read_items(t.path, f"eval.tasks[{i}].path", t.max_items))
                 for i, t in enumerate(job.eval.tasks)]
        return cls([(s.name, s.role, m) for s, m in zip(job.data.sources, manifests)], probes, tasks, tokenizer,
                   max_rows=job.eval.max_rows, seq_len=job.data.seq_len, batch_size=job.train.micro_batch_size,
                   tasks_at=job.eval.tasks_at, rank=rank, world=world, device=device)

    # -- state (kept in the train state, so a resumed run still compares with its step 0)
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history]}  # a snapshot: an async save commits it later

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))

    @property
    def baseline(self) -> dict[str, Any] | None:
        return self.history[0] if self.history else None

    def summary(self) -> str:
        held = sum(len(r) for r in self.source_rows.values())
        parts = [f"{held} held-out rows over {len(self.source_rows)} source(s)"]
        if self.probe_rows:
            parts.append(f"probes {', '.join(f'{k} ({len(v)} rows)' for k, v in self.probe_rows.items())}")
        if self.tasks:
            parts.append(f"tasks {', '.join(f'{k} ({len(v[0])} items)' for k, v in self.tasks.items())}"
                         " scored " + ("at every evaluation" if self.tasks_at == "every_eval"
                                       else "at step 0 and the end"))
        if not held and not self.probe_rows and not self.tasks:
            return "eval: no held-out rows in any source (prepare with --eval-fraction), no probes, no tasks; " \
                   "evaluation is off"
        return "eval: " + "; ".join(parts)

    def evaluate(self, model: nn.Module, step: int, final: bool = False) -> dict[str, Any] | None:
        """Evaluate everything at `step` on every rank together; append and return the record
        (None when there is nothing to evaluate)."""
        losses = eval_losses(model, self.source_rows, self.rank, self.world, self.batch_size, self.device)
        probes = eval_losses(model, self.probe_rows, self.rank, self.world, self.batch_size, self.device)
        score_tasks = self.tasks and (self.tasks_at == "every_eval" or final or not self.history)
        tasks = {name: accuracy(items, reqs, loglikelihoods(model, reqs, self.rank, self.world, self.batch_size,
                                                            self.device))
                 for name, (items, reqs) in self.tasks.items()} if score_tasks else {}
        if not losses and not probes and not tasks:
            return None
        base = self.baseline or {"loss": losses, "probe_loss": probes}
        replay = [k for k, r in self.roles.items() if r == "replay"]
        record: dict[str, Any] = {
            "step": step, "loss": losses,
            "forgetting": {k: v for k, v in forgetting(losses, base["loss"]).items() if k in replay},
            "probe_loss": probes, "probe_forgetting": forgetting(probes, base.get("probe_loss", {})),
        }
        record["relative_forgetting"] = {
            **{k: relative(losses[k], base["loss"][k]) for k in record["forgetting"]},
            **{k: relative(probes[k], base["probe_loss"][k]) for k in record["probe_forgetting"]}}
        if tasks:
            record["tasks"] = tasks
        self.history.append(record)
        return record


def report_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An eval record as flat Ray Train metrics (what `raycpt tune` scores, raycpt/tune/objective.py):
    eval/loss/<source>, eval/forgetting/<replay source>, eval/probe_loss/<probe>,
    eval/probe_forgetting/<probe>, eval/relative_forgetting/<name>, eval/task_acc/<task>,
    eval/task_acc_norm/<task>."""
    out: dict[str, float] = {}
    for field in ("loss", "forgetting", "probe_loss", "probe_forgetting", "relative_forgetting"):
        out.update({f"eval/{field}/{k}": float(v) for k, v in record.get(field, {}).items()})
    for name, t in record.get("tasks", {}).items():
        out[f"eval/task_acc/{name}"] = float(t["acc"])
        out[f"eval/task_acc_norm/{name}"] = float(t["acc_norm"])
    return out
