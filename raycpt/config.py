"""One typed config tree for a raycpt job, loaded from YAML with dotted overrides.

    job = load_job("jobs/demo.yaml", ["train.max_steps=20", "data.sources[1].weight=0.5"])

Every field carries a description and its unit. Validation runs when the job loads and reports
every problem at once with its dotted path and the fix, e.g.
``data.sources[1].weight: must be > 0 (got -1)``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raycpt.errors import RaycptError


class ConfigError(RaycptError, ValueError):
    """A job config that cannot run; the message lists every problem with its dotted key."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field(
        description="Run name; with `storage` it fixes the run folder, so a resubmitted job finds "
        "its own checkpoints. Never derived from a timestamp.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    )
    storage: str = Field(
        description="Where runs live: a local path, file:// or s3:// URI. The run folder is "
        "<storage>/<name>."
    )
    seed: int = Field(0, ge=0, description="Seed of the data order and of model init where one is needed.")
    s3_endpoint_url: str | None = Field(
        None,
        description="Endpoint of an S3-compatible store (MinIO, GCS interop, a test server); "
        "None means AWS. Credentials come from the usual AWS environment/config chain.",
    )


class InitConfig(_Section):
    """How a run with no committed checkpoint of its own begins (a resume ignores this)."""

    source: Literal["base", "run", "adapter"] = Field(
        "base",
        description="`base`: weights of `model.base` (an HF folder); `run`: another raycpt run's "
        "newest committed checkpoint (`init.run`); `adapter`: `model.base` plus a saved LoRA "
        "adapter (`init.adapter`, needs `model.lora`), optimizer fresh.",
    )
    run: str | None = Field(None, description="Run folder URI to start from when source=run.")
    adapter: str | None = Field(
        None, description="PEFT adapter folder (adapter_config.json + adapter_model.safetensors, as "
        "`raycpt export --adapter` or peft's save_pretrained write it) when source=adapter."
    )
    load: Literal["weights", "weights+optimizer"] = Field(
        "weights",
        description="What to take from `init.run`: weights only (NeMo restore_from_path) or "
        "weights and optimizer state (restore_from_ckpt). Step, data position and schedule "
        "always start fresh.",
    )


class LoraConfig(_Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear layers that get adapters.",
    )
    train_embeddings: bool = Field(
        True, description="Also train embed_tokens and lm_head in full (the Unsloth CPT recipe)."
    )


class ModelConfig(_Section):
    base: str | None = Field(
        None, description="The base model: a local HF folder (config.json, safetensors, tokenizer)."
    )
    init: InitConfig = Field(default_factory=InitConfig)
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "bfloat16",
        description="Compute dtype of FSDP2 mixed precision on GPU (master weights stay fp32). "
        "CPU runs always compute in float32.",
    )
    attn_implementation: str = Field("sdpa", description="HF attention kernel: sdpa or eager.")
    compile: bool = Field(False, description="torch.compile on GPU: each decoder block under FSDP2; on one "
                          "worker's plain module the whole decoder stack, captured in CUDA graphs.")
    single_worker: Literal["auto", "plain", "fsdp2"] = Field(
        "auto", description="How one worker holds the model. plain: the module itself (fp32 weights, bf16 "
        "autocast, no FSDP2 hooks or DTensors; with compile, CUDA graphs): for small, host-bound models. "
        "fsdp2: as on many workers (bf16 parameters; faster where the GPU is the limit; a sharded run's "
        "memory plan). auto: plain below 0.5B parameters, fsdp2 from there (docs/performance.md)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder block's activations in backward to save memory."
    )
    loss_chunk_tokens: int = Field(
        8192, ge=0, description="Tokens per chunk of the fused LM-head + cross-entropy, which never holds "
        "full-vocabulary fp32 logits (raycpt/model/loss.py); 0: the model's own loss."
    )
    freeze_layers: int = Field(
        0, ge=0, description="Freeze the lowest k decoder blocks (their adapters too under LoRA)."
    )
    freeze_embeddings: bool = Field(
        False, description="Freeze embed_tokens (and lm_head when the model ties them)."
    )
    lora: LoraConfig | None = Field(None, description="LoRA continued pretraining when set.")


class SourceConfig(_Section):
    name: str = Field(description="Domain name used in metrics, eval and status.", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="Prepared token shards (a folder or URI with manifest.json).")
    weight: float | None = Field(
        None, description="Share of every global batch (normalised over sources). "
        "Leave unset on all sources when `data.replay_ratio` is used."
    )
    role: Literal["new", "replay"] = Field(
        "new", description="`new`: the domain being learned; `replay`: old data against forgetting."
    )
    epochs: int | None = Field(
        None, gt=0, description="Stop drawing from this source after this many passes (None: cycle)."
    )


class PhaseConfig(_Section):
    start_step: int = Field(gt=0, description="First optimizer step at which these weights apply.")
    weights: dict[str, float] = Field(description="Source name -> weight from start_step on.")


class DataConfig(_Section):
    seq_len: int = Field(gt=1, description="Tokens per training sequence; must equal the shards'.")
    sources: list[SourceConfig] = Field(min_length=1)
    replay_ratio: float | None = Field(
        None, ge=0, lt=1,
        description="Shorthand: replay sources share this fraction of each batch, new ones the rest "
        "(split by their `weight`, equal if unset).",
    )
    phases: list[PhaseConfig] = Field(default_factory=list, description="Blend changes at given steps.")
    shuffle_window_rows: int = Field(
        1024, gt=0, description="Rows shuffled together after the seeded shard order (bounded memory)."
    )
    prefetch_batches: int = Field(4, ge=1, description="Global-batch slices each worker reads ahead.")
    reader_cpus: float = Field(
        0.25, gt=0, description="CPUs a Ray Data read task reserves (reads are I/O bound)."
    )


class TrainConfig(_Section):
    global_batch_size: int = Field(gt=0, description="Sequences per optimizer step, all workers together.")
    micro_batch_size: int = Field(1, gt=0, description="Sequences per forward pass on one worker.")
    max_steps: int = Field(gt=0, description="Optimizer steps of the run.")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; None: off.")
    log_interval_steps: int = Field(1, gt=0, description="Steps between progress lines and metric reports.")
    log_sample_ids: bool = Field(
        False, description="Audit log: write the global sample ids of every step to <run>/samples/ "
        "at each checkpoint (resume-equivalence checks read it)."
    )
    preemption_poll_steps: int = Field(
        10, gt=0, description="Steps between checks for a spot preemption notice (a cross-worker barrier)."
    )


class OptimConfig(_Section):
    peak_lr: float = Field(gt=0, description="Learning rate at the end of the re-warm.")
    start_lr: float = Field(0.0, ge=0, description="Learning rate at step 0 of the re-warm.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of the re-decay.")
    min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="When set, min_lr = min_lr_ratio x peak_lr (it replaces min_lr), so a "
        "sweep of peak_lr keeps the decay's floor a fixed fraction of the peak.")
    warmup_steps: int = Field(0, ge=0, description="Re-warm length in steps.")
    schedule: Literal["cosine", "linear", "wsd", "constant"] = Field(
        "cosine", description="Re-decay shape after the re-warm; wsd: constant, then a linear cooldown."
    )
    cooldown_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: share of max_steps spent cooling down to min_lr."
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (not on norms/biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    embedding_lr_ratio: float = Field(
        1.0, gt=0, le=1,
        description="LR of embed_tokens and lm_head as a fraction of the schedule's LR.",
    )

    @model_validator(mode="before")
    @classmethod
    def _min_lr_from_ratio(cls, data: Any) -> Any:
        # Derived before field validation, so min_lr is always the value the schedule uses.
        if isinstance(data, dict) and data.get("min_lr_ratio") is not None and data.get("peak_lr") is not None:
            try:
                return {**data, "min_lr": float(data["min_lr_ratio"]) * float(data["peak_lr"])}
            except (TypeError, ValueError):
                return data  # the field checks name the bad value
        return data


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] = Field(
        1, description="Training workers: a number, or [min, max] for an elastic run."
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU workers on gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker reserves.")


class CheckpointConfig(_Section):
    interval_steps: int = Field(gt=0, description="Steps between checkpoints (the last step saves too, "
                                "unless final_save is false).")
    final_save: bool = Field(
        True, description="Save at the last step. false: only interval saves, for throwaway runs (benchmarks: "
        "tens of GB per save at 3B-8B); a resubmitted run then repeats the steps since its last save."
    )
    keep_last: int = Field(2, gt=0, description="Committed checkpoints kept, newest first.")
    keep_every_steps: int | None = Field(
        None, gt=0, description="Also keep every checkpoint whose step is a multiple of this."
    )
    async_save: bool = Field(
        True, description="Persist in the background while training goes on (at most one in flight)."
    )
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts Ray Train makes before giving up (-1: unlimited)."
    )


class ProbeConfig(_Section):
    """An eval-only set: text the base model knew that this job never trains on."""

    name: str = Field(description="Probe name used in metrics, eval and status (unique among sources and "
                      "probes).", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="A prepared source (folder or URI with manifest.json), best one prepared with "
                      "`raycpt prepare --eval-fraction 1` (all rows held out). Its held-out rows are read first, "
                      "then its training rows: the job never trains on it either way.")


class TaskConfig(_Section):
    """A multiple-choice task scored by log-likelihood (the lm-eval-harness way)."""

    name: str = Field(description="Task name used in metrics, eval and status.", pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="JSON-lines file (local or URI), one item per line: {\"context\": str, "
                      "\"choices\": [str, ...], \"gold\": index of the right choice}.")
    max_items: int | None = Field(None, gt=0, description="Score only the first N items (None: all).")


class EvalConfig(_Section):
    interval_steps: int | None = Field(
        None, gt=0, description="Steps between held-out evaluations; None: only at step 0 and the end."
    )
    max_rows: int = Field(64, gt=0, description="Held-out sequences evaluated per source and per probe.")
    probes: list[ProbeConfig] = Field(
        default_factory=list, description="Eval-only sets (never trained on, not in the blend), evaluated with "
        "the sources; their loss rise since step 0 is the forgetting replay cannot hide.")
    tasks: list[TaskConfig] = Field(
        default_factory=list, description="Multiple-choice tasks: accuracy (acc, acc_norm) of the choice with "
        "the highest log-likelihood given the context.")
    tasks_at: Literal["every_eval", "start_and_end"] = Field(
        "every_eval", description="When tasks are scored: at every evaluation, or only at step 0 and the last "
        "step (for large task files; one forward pass per choice).")


class MetricsConfig(_Section):
    """Where metrics go besides the driver's progress line, Ray's reports and <run>/metrics/."""

    tensorboard: bool = Field(True, description="Write TensorBoard event files to <run>/metrics/tb.")
    mlflow_tracking_uri: str | None = Field(
        None, description="Also log to this MLflow tracking server (needs mlflow installed on the workers)."
    )
    mlflow_experiment: str | None = Field(None, description="MLflow experiment; None: the run name.")
    wandb_project: str | None = Field(
        None, description="Also log to this Weights & Biases project from rank 0 (needs wandb installed: "
        "pip install 'raycpt[wandb]'); a resumed run continues the same W&B run."
    )
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); None: the API key's default.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; offline writes the run under <run>/metrics/wandb/ for `wandb sync`; "
        "None: WANDB_MODE or online."
    )

    def wandb_init(self) -> dict[str, str | None] | None:
        """The W&B target MetricsLog starts, or None when W&B is off."""
        if not self.wandb_project:
            return None
        return {"project": self.wandb_project, "entity": self.wandb_entity, "mode": self.wandb_mode}


class ResumeConfig(_Section):
    allow_changes: list[str] = Field(
        default_factory=list,
        description="Dotted keys whose change since the run's last checkpoint is intended "
        "(e.g. data.sources, train.global_batch_size); any other change refuses the resume.",
    )


class JobConfig(_Section):
    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    resume: ResumeConfig = Field(default_factory=ResumeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        problems: list[str] = []
        names = [s.name for s in self.data.sources]
        if len(set(names)) != len(names):
            problems.append(f"data.sources: names must be unique (got {names})")
        for i, s in enumerate(self.data.sources):
            if s.weight is not None and s.weight <= 0:
                problems.append(f"data.sources[{i}].weight: must be > 0 (got {s.weight}); remove the source instead")
        if self.data.replay_ratio is not None:
            roles = {s.role for s in self.data.sources}
            if self.data.replay_ratio > 0 and "replay" not in roles:
                problems.append("data.replay_ratio: no source has role: replay; mark the old-data sources")
            if "new" not in roles:
                problems.append("data.replay_ratio: no source has role: new; mark the new-domain sources")
        elif any(s.weight is None for s in self.data.sources):
            problems.append("data.sources[*].weight: set a weight on every source, or set data.replay_ratio")
        last = 0
        for i, p in enumerate(self.data.phases):
            if p.start_step <= last:
                problems.append(f"data.phases[{i}].start_step: must increase (got {p.start_step} after {last})")
            last = p.start_step
            for name, w in p.weights.items():
                if name not in names:
                    problems.append(f"data.phases[{i}].weights.{name}: no such source; choose from {names}")
                elif w < 0:
                    problems.append(f"data.phases[{i}].weights.{name}: must be >= 0 (got {w})")
            if sum(p.weights.values()) <= 0:
                problems.append(f"data.phases[{i}].weights: at least one weight must be > 0")
        if self.metrics.wandb_project and importlib.util.find_spec("wandb") is None:
            problems.append("metrics.wandb_project: set, but wandb is not installed; "
                            "pip install 'raycpt[wandb]' (or pip install wandb), or unset the key")
        nw = self.scaling.num_workers
        lo, hi = (nw, nw) if isinstance(nw, int) else nw
        if lo < 1 or hi < lo:
            problems.append(f"scaling.num_workers: need 1 <= min <= max (got {nw})")
        # Ray Train may start an elastic run at any size in the range, so every size must split
        # the global batch into whole micro batches per worker, not only the two ends.
        per_worker = [w for w in range(max(lo, 1), hi + 1)
                      if self.train.global_batch_size % (self.train.micro_batch_size * w)]
        if per_worker and lo == hi:
            problems.append(
                f"train.global_batch_size: {self.train.global_batch_size} is not a multiple of "
                f"micro_batch_size x workers = {self.train.micro_batch_size * lo}; pick a multiple so gradient "
                f"accumulation keeps the global batch exact"
            )
        elif per_worker:
            fits = [w for w in range(lo, hi + 1) if w not in per_worker]
            sizes = ", ".join(str(w) for w in per_worker)
            problems.append(
                f"scaling.num_workers: [{lo}, {hi}] includes {sizes} worker(s), which do not split "
                f"train.global_batch_size {self.train.global_batch_size} into micro batches of "
                f"train.micro_batch_size {self.train.micro_batch_size}; use a range whose every size does"
                + (f" (of these: {' or '.join(str(w) for w in fits)})" if fits else "")
                + " or make train.global_batch_size a multiple of micro_batch_size x every size"
                f" (e.g. {self.train.micro_batch_size * math.lcm(*range(lo, hi + 1))})"
            )
        if self.optim.warmup_steps > self.train.max_steps:
            problems.append(f"optim.warmup_steps: {self.optim.warmup_steps} exceeds train.max_steps "
                            f"{self.train.max_steps}")
        if self.optim.min_lr > self.optim.peak_lr:
            problems.append("optim.min_lr: must not exceed optim.peak_lr")
        if self.model.init.source == "base" and not self.model.base:
            problems.append("model.base: required when model.init.source is base (an HF folder)")
        if self.model.init.source == "run" and not self.model.init.run:
            problems.append("model.init.run: required when model.init.source is run (a run folder URI)")
        if self.model.init.source == "adapter":
            if not self.model.init.adapter:
                problems.append("model.init.adapter: required when model.init.source is adapter "
                                "(a PEFT adapter folder)")
            if self.model.lora is None:
                problems.append("model.lora: required when model.init.source is adapter; set it to the adapter's shape")
        source_paths = {s.path.rstrip("/") for s in self.data.sources}
        seen = set(names)
        for i, p in enumerate(self.eval.probes):
            if p.name in seen:
                problems.append(f"eval.probes[{i}].name: {p.name!r} is already a source or probe name; "
                                "names must be unique across data.sources and eval.probes")
            seen.add(p.name)
            if p.path.rstrip("/") in source_paths:
                problems.append(f"eval.probes[{i}].path: {p.path} is also in data.sources; a probe is never "
                                "trained on, so drop it from data.sources (its held-out split is already evaluated)")
        task_names = [t.name for t in self.eval.tasks]
        if len(set(task_names)) != len(task_names):
            problems.append(f"eval.tasks: names must be unique (got {task_names})")
        if self.model.lora is not None and self.model.lora.train_embeddings and self.model.freeze_embeddings:
            problems.append("model.freeze_embeddings: contradicts model.lora.train_embeddings; set one of them false")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def run_uri(self) -> str:
        return self.run.storage.rstrip("/") + "/" + self.run.name

    def worker_range(self) -> tuple[int, int]:
        nw = self.scaling.num_workers
        return (nw, nw) if isinstance(nw, int) else tuple(nw)

    def fingerprint(self, keys: tuple[str, ...] = ()) -> str:
        """Stable hash of the given top-level sections (all when empty)."""
        d = self.model_dump(mode="json")
        if keys:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading

_INDEX = re.compile(r"^([^\[\]]+)((?:\[\d+\])*)$")


def split_dotted(path: str) -> list[str | int]:
    """`a.b[1].c` -> ['a', 'b', 1, 'c']."""
    parts: list[str | int] = []
    for token in path.split("."):
        m = _INDEX.match(token)
        if not m:
            raise ConfigError(f"override {path!r}: cannot parse {token!r}; use a.b.c=value or a.b[0].c=value")
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def _parse_override_value(item: str, raw: str) -> Any:
    if not raw.strip():
        return None
    try:
        return yaml.load(raw, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote it as a string "
            "(key='\"text\"') or fix the brackets, e.g. train.max_steps=6 or data.phases=[]"
        ) from None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `tree` with `a.b[1].c=value` overrides applied; values parse as YAML."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = split_dotted(key)
        value = _parse_override_value(item, raw)
        node: Any = tree
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            here = dotted_path(tuple(parts[: i + 1]))
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"override {key}: index [{part}] is out of range")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key}: {dotted_path(tuple(parts[:i])) or 'the job'} is "
                                      f"{_kind(node)}, not a section; it has no key {part!r}")
                if node.get(part) is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            if isinstance(nxt, int) and not isinstance(node, list):
                raise ConfigError(f"override {key}: {here} is {_kind(node)}, not a list; drop the [{nxt}]")
            if not isinstance(nxt, int) and not isinstance(node, dict):
                raise ConfigError(f"override {key}: {here} is {_kind(node)}, not a section, so it has no "
                                  f"key {nxt!r}; set {here}=VALUE instead")
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(f"override {key}: index [{last}] is out of range")
        node[last] = value
    return tree


def _kind(node: Any) -> str:
    return f"a list ({len(node)} items)" if isinstance(node, list) else f"the value {node!r}"


def dotted_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


def fix_hint(err: dict[str, Any], model: type[BaseModel] | None = None) -> str:
    """What to do about one pydantic error; an unknown key gets the nearest known key of its
    section (`model` is the class validated, JobConfig by default)."""
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _section_keys(model or JobConfig, err["loc"][:-1])
        near = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
        if near:
            return f"unknown key; did you mean {dotted_path((*err['loc'][:-1], near[0]))}?"
        return f"unknown key; the keys here are {', '.join(known)}" if known else "unknown key"
    if kind == "missing":
        return "required; add it to the job YAML or pass it as an override"
    return err["msg"].lower() if err.get("msg") else kind


def _section_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at `loc` (list indices skipped); [] if unknown."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        cls = _model_in(field.annotation) if field is not None else None
        if cls is None:
            return []
    return sorted(getattr(cls, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def parse_job(tree: dict[str, Any]) -> JobConfig:
    """Validate a plain dict as a job; raise ConfigError listing every problem."""
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = dotted_path(err["loc"])
            if err["type"] == "value_error" and not err["loc"]:
                # Cross-field checks already name their keys.
                lines.extend(str(err["ctx"]["error"]).splitlines())
                continue
            got = err.get("input")
            got_txt = f" (got {got!r})" if err["type"] not in ("missing",) and not isinstance(got, dict) else ""
            lines.append(f"{path}: {fix_hint(err)}{got_txt}")
        raise ConfigError("invalid job config:\n  " + "\n  ".join(lines)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error naming both
    lines (plain YAML keeps the last silently, so a section written twice loses the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); merge them "
                    "into one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line with its line number (yaml's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{context}, {problem}" if context else problem)


def read_yaml_tree(path: str | Path) -> dict[str, Any]:
    """A job YAML file as a dict of sections; errors name the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path}: is a folder, not a job YAML; give the .yaml file (e.g. jobs/demo.yaml)")
    if not p.exists():
        raise ConfigError(f"{path}: no such job YAML; check the path (jobs/ has the shipped ones)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); give a job YAML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: a binary file, not a job YAML")
    try:
        tree = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a job YAML must be a mapping of sections (run, model, data, ...)")
    return tree


def load_job_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    tree = read_yaml_tree(path)
    tree.pop("tune", None)  # the sweep section belongs to `raycpt tune`
    return apply_overrides(tree, list(overrides))


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load a job YAML, apply dotted overrides, validate; relative paths resolve against the YAML."""
    tree = load_job_tree(path, overrides)
    base_dir = Path(path).resolve().parent
    job = parse_job(tree)
    return resolve_relative_paths(job, base_dir)


def _resolve(p: str, base_dir: Path) -> str:
    if "://" in p or Path(p).is_absolute():
        return p
    return str((base_dir / p).resolve())


def resolve_relative_paths(job: JobConfig, base_dir: Path) -> JobConfig:
    """Make local paths absolute so they mean the same on every worker node."""
    job = job.model_copy(deep=True)
    job.run.storage = _resolve(job.run.storage, base_dir)
    if job.model.base:
        job.model.base = _resolve(job.model.base, base_dir)
    if job.model.init.run:
        job.model.init.run = _resolve(job.model.init.run, base_dir)
    if job.model.init.adapter:
        job.model.init.adapter = _resolve(job.model.init.adapter, base_dir)
    for s in job.data.sources:
        s.path = _resolve(s.path, base_dir)
    for item in [*job.eval.probes, *job.eval.tasks]:
        item.path = _resolve(item.path, base_dir)
    return job


def source_weights(data: DataConfig, phase_weights: dict[str, float] | None = None) -> list[float]:
    """Normalised weights per source (in `data.sources` order) for a phase, or the base blend."""
    if phase_weights is not None:
        raw = [float(phase_weights.get(s.name, 0.0)) for s in data.sources]
    elif data.replay_ratio is None:
        raw = [float(s.weight) for s in data.sources]  # validated non-None
    else:
        share_of_role = {"new": 1.0 - data.replay_ratio, "replay": data.replay_ratio}
        role_total = {
            role: sum(s.weight or 1.0 for s in data.sources if s.role == role) for role in share_of_role
        }
        raw = [share_of_role[s.role] * (s.weight or 1.0) / role_total[s.role] for s in data.sources]
    total = sum(raw)
    return [w / total for w in raw]
