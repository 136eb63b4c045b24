"""The start decision, made automatically at every (re)start of a run.

1. The run has a committed checkpoint -> full resume (model, optimizer, step, data position, RNG).
2. Else `model.init` says how to begin: `base` (HF weights only) or another run's newest
   committed checkpoint as `weights` or `weights+optimizer`; step, data and schedule start fresh.
3. Else a clear error.

A resume whose resume-critical config changed is refused with the list of differences unless
each changed key is listed in `resume.allow_changes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from raycpt.checkpoint.integrity import check_checkpoint, newest_loadable
from raycpt.checkpoint.layout import CheckpointEntry, checkpoint_uri_of
from raycpt.checkpoint.state import ResumeError, TrainState
from raycpt.config import JobConfig

__all__ = ["ResumeError", "StartDecision", "check_resume_config", "decide_start", "flatten"]

# Keys whose change makes "the same run" a different run. Everything else (LR schedule,
# eval, logging, worker count, checkpoint cadence) may change at a resume and applies from then.
RESUME_CRITICAL = (
    "model.base", "model.lora", "model.freeze_layers", "model.freeze_embeddings",
    "data.seq_len", "data.sources", "data.replay_ratio", "data.phases", "data.shuffle_window_rows",
    "train.global_batch_size", "run.seed",
)

@dataclass(frozen=True)
class StartDecision:
    kind: Literal["resume", "fresh_base", "fresh_run"]
    checkpoint: CheckpointEntry | None
    train_state: TrainState | None
    load_optimizer: bool
    message: str

    @property
    def start_step(self) -> int:
        """The step training continues from: the checkpoint's on a resume, else 0."""
        return self.train_state.step if self.kind == "resume" else 0


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts) as {"a.b[0].c": value}."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out if out else {prefix: d}
    return {prefix: d}


def critical_view(job_dump: dict[str, Any]) -> dict[str, Any]:
    flat = flatten(job_dump)
    return {k: v for k, v in flat.items() if any(k == c or k.startswith(c + ".") or k.startswith(c + "[")
                                                 for c in RESUME_CRITICAL)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = critical_view(saved), critical_view(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def allow_key(key: str) -> str:
    """The narrowest `resume.allow_changes` entry that admits a change of `key`: its resume-critical
    key (`data.sources[0].path` -> `data.sources`, not `data`)."""
    return next((c for c in RESUME_CRITICAL if key == c or key.startswith((c + ".", c + "["))), key)


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in allow)


def _with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved config as this version of raycpt reads it: a key added since the checkpoint was
    written takes its default instead of counting as a change."""
    from raycpt.config import ConfigError, parse_job

    try:
        return parse_job(saved).model_dump(mode="json")
    except ConfigError:  # a key since removed or renamed: compare what was written
        return saved


def check_resume_config(saved: dict[str, Any], job: JobConfig) -> list[str]:
    """Intended differences (allowed); raises ResumeError listing any that are not."""
    diffs = config_differences(_with_current_defaults(saved), job.model_dump(mode="json"))
    blocked = [d for d in diffs if not _allowed(d[0], job.resume.allow_changes)]
    if blocked:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in blocked)
        keys = sorted({allow_key(k) for k, _, _ in blocked})
        raise ResumeError(
            f"run {job.run.name}: the config changed since its last checkpoint:\n{lines}\n"
            f"Revert the change, use another run.name, or mark it intended with "
            f"resume.allow_changes=[{', '.join(keys)}]"
        )
    return [k for k, _, _ in diffs]


def decide_start(job: JobConfig) -> StartDecision:
    run_uri = job.run_uri
    found = newest_loadable(run_uri)  # a damaged newest checkpoint falls back to the previous one, logged
    if found is not None:
        latest, state = found
        return StartDecision("resume", latest, state, True,
                             f"resuming step {state.step} of run {job.run.name} from {latest.uri}")
    init = job.model.init
    if init.source == "run":
        entry = checkpoint_uri_of(init.run)
        if entry is None:
            raise ResumeError(f"model.init.run: {init.run} has no committed checkpoint to start from")
        return StartDecision("fresh_run", entry, check_checkpoint(entry),
                             init.load == "weights+optimizer",
                             f"fresh from run checkpoint {entry.uri} ({init.load})")
    if job.model.base:
        return StartDecision("fresh_base", None, None, False, f"fresh from {job.model.base}")
    raise ResumeError("model.base: no committed checkpoint in this run and nothing to start from; "
                      "set model.base (an HF folder) or model.init.run")
