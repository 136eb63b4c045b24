"""Where a run keeps its checkpoints, and which of them are complete.

    <run>/checkpoints/step-00000040/   DCP shards (*.distcp, .metadata) written by every rank
                                      train_state.json  step, data position, RNG, config, ...
                                      COMMITTED         written last, after every rank finished
    <run>/metrics/                    eval history, metrics log, TensorBoard events

Only a folder with COMMITTED is ever loaded; anything else is an interrupted save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from raycpt import storage

COMMIT_MARKER = "COMMITTED"
TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def step_uri(run_uri: str, step: int) -> str:
    return storage.join(checkpoints_uri(run_uri), f"step-{step:08d}")


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    uri: str
    committed: bool


def list_checkpoints(run_uri: str) -> list[CheckpointEntry]:
    """Every checkpoint folder of a run, oldest first, with whether it committed."""
    out = []
    for name in storage.list_dir(checkpoints_uri(run_uri)):
        m = _STEP_DIR.match(name)
        if not m:
            continue
        uri = storage.join(checkpoints_uri(run_uri), name)
        out.append(CheckpointEntry(int(m.group(1)), uri, storage.exists(storage.join(uri, COMMIT_MARKER))))
    return sorted(out, key=lambda e: e.step)


def latest_committed(run_uri: str) -> CheckpointEntry | None:
    done = [e for e in list_checkpoints(run_uri) if e.committed]
    return done[-1] if done else None


def checkpoint_uri_of(uri: str) -> CheckpointEntry | None:
    """A run folder -> its newest committed checkpoint; a checkpoint folder -> itself if committed."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    m = _STEP_DIR.match(name)
    if m:
        committed = storage.exists(storage.join(uri, COMMIT_MARKER))
        return CheckpointEntry(int(m.group(1)), uri.rstrip("/"), committed) if committed else None
    return latest_committed(uri)


def to_delete(entries: list[CheckpointEntry], keep_last: int, keep_every_steps: int | None,
              in_flight_step: int | None = None) -> list[CheckpointEntry]:
    """Retention: keep the newest `keep_last` committed, every multiple of `keep_every_steps`,
    never the newest committed; uncommitted folders other than the one being written are
    leftovers of interrupted saves and go."""
    committed = [e for e in entries if e.committed]
    keep = {e.step for e in committed[-keep_last:]}
    if committed:
        keep.add(committed[-1].step)
    if keep_every_steps:
        keep |= {e.step for e in committed if e.step % keep_every_steps == 0}
    doomed = [e for e in committed if e.step not in keep]
    doomed += [e for e in entries if not e.committed and e.step != in_flight_step]
    return doomed
