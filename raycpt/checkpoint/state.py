"""The train state: everything besides the DCP shards that a checkpoint holds, as one typed record.

Written by rank 0 as `train_state.json` beside the shards (before the commit marker) and read by
the start decision, `raycpt status`, `raycpt export`, `raycpt plot` and the demo. Progress is
global (step, the blend plan's position, tokens per source), never per rank, so the state loads on
any world size. `format_version` is checked on every read: a state written by a newer raycpt is
refused with a ResumeError rather than misread.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raycpt import storage
from raycpt.checkpoint.layout import TRAIN_STATE
from raycpt.errors import RaycptError

# 1: the first format. Bump on any change a reader of the old format would misread.
TRAIN_STATE_VERSION = 1


class ResumeError(RaycptError, RuntimeError):
    """A resume that would silently change the run, or a checkpoint that cannot be resumed from;
    the message says what and how to go on."""


@dataclass(frozen=True)
class TrainState:
    step: int  # optimizer steps done; the LR schedule is a function of it
    data: dict[str, Any]  # the blend plan's position (`PlanState.state_dict()`)
    source_names: list[str]  # the order `data`'s per-source counts are in
    tokens_per_source: dict[str, int]
    config: dict[str, Any]  # the job as trained (the resume check compares against it)
    config_fingerprint: str
    world_size: int  # workers that wrote the checkpoint (any number may load it)
    rng: dict[str, Any]  # {"torch": the CPU generator's state as a list of bytes}
    versions: dict[str, str]
    wall_time: float
    reason: str | None = None  # why it was saved: interval, final, preemption notice, SIGTERM, ...
    # Evaluation records, opaque here (raycpt/train/evaluate.py defines them).
    eval_history: list[Any] = field(default_factory=list)
    format_version: int = TRAIN_STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "train state") -> "TrainState":
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ResumeError(f"{where}: no format_version; not a raycpt train state")
        if version > TRAIN_STATE_VERSION:
            raise ResumeError(
                f"{where}: format_version {version} was written by a newer raycpt (this one reads up to "
                f"{TRAIN_STATE_VERSION}); upgrade raycpt on the cluster, or start another run.name")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - d.keys())
        if missing:
            raise ResumeError(f"{where}: missing {', '.join(missing)}; the checkpoint is damaged, delete it "
                              "(an older committed one is then used)")
        return cls(**{k: v for k, v in d.items() if k in names})


def read_train_state(checkpoint_uri: str) -> TrainState:
    """The train state of a (committed) checkpoint folder."""
    uri = storage.join(checkpoint_uri, TRAIN_STATE)
    return TrainState.from_json(storage.read_json(uri), where=uri)


def write_train_state(checkpoint_uri: str, state: TrainState) -> None:
    storage.write_json(storage.join(checkpoint_uri, TRAIN_STATE), state.to_json())


def standalone_train_state(step: int, reason: str) -> TrainState:
    """The train state of a save that belongs to no training run (`raycpt bench checkpoint`):
    its step, nothing else to resume."""
    import time

    return TrainState(step=step, data={}, source_names=[], tokens_per_source={}, config={}, config_fingerprint="",
                      world_size=1, rng={}, versions={}, wall_time=time.time(), reason=reason)
