"""Is a committed checkpoint loadable? Checked from storage alone, before anything loads it.

A commit marker says every rank finished writing; it does not stop a file from being damaged
later (a truncated copy, a partial restore from backup, a crafted upload). Before a resume, an
init from another run, `raycpt export` or `raycpt status` uses a checkpoint, these checks read
its `train_state.json` (must parse), its DCP `.metadata` (through the restricted unpickler) and
the size of every shard file the metadata points into (a truncated shard is too short for its
last chunk). A resume whose newest checkpoint fails them falls back to the previous committed
one and says so; nothing is ever deleted here.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from raycpt import storage
from raycpt.checkpoint.layout import TRAIN_STATE, CheckpointEntry, list_checkpoints
from raycpt.checkpoint.metadata import CheckpointError, UnsafeCheckpointError, read_metadata
from raycpt.checkpoint.state import TrainState
from raycpt.errors import error_chain, find_raycpt_error


def read_train_state(checkpoint_uri: str) -> TrainState:
    """A checkpoint's train state; CheckpointError naming the file when it is missing or broken
    (a state written by a newer raycpt stays a ResumeError: falling back would not help)."""
    uri = storage.join(checkpoint_uri, TRAIN_STATE)
    try:
        raw = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: missing although the checkpoint committed; the folder was damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{uri}: not valid JSON ({e}); the file was truncated or damaged") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{uri}: not a JSON object; it was not written by raycpt's checkpointer")
    return TrainState.from_json(raw, where=uri)


def shard_problems(checkpoint_uri: str) -> list[str]:
    """Shard files the metadata points into that are missing or shorter than their last chunk."""
    meta = read_metadata(checkpoint_uri)
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if rel:
            need[rel] = max(need.get(rel, 0), end)
    problems = []
    for rel, end in sorted(need.items()):
        uri = storage.join(checkpoint_uri, rel)
        fs, path = storage.filesystem(uri)
        try:
            size = int(storage.with_retries(lambda: fs.size(path), f"checking {uri}"))
        except FileNotFoundError:
            problems.append(f"{uri}: missing")
            continue
        if size < end:
            problems.append(f"{uri}: {size} bytes, but its chunks end at byte {end} (truncated)")
    return problems


def check_checkpoint(entry: CheckpointEntry) -> TrainState:
    """The train state of a loadable checkpoint; CheckpointError naming the damaged file otherwise."""
    state = read_train_state(entry.uri)
    problems = shard_problems(entry.uri)
    if problems:
        raise CheckpointError(f"checkpoint {entry.uri} is damaged: " + "; ".join(problems))
    return state


def newest_loadable(run_uri: str, log: Callable[[str], None] = print) -> tuple[CheckpointEntry, TrainState] | None:
    """The newest committed checkpoint that passes the checks, with its train state; None when the
    run has no committed checkpoint. Each damaged one skipped is logged with its file; a crafted
    one (metadata that would import code) stops the resume instead, and so does a run whose every
    committed checkpoint is damaged."""
    committed = [e for e in list_checkpoints(run_uri) if e.committed]
    if not committed:
        return None
    skipped: list[str] = []
    for entry in reversed(committed):
        try:
            return entry, check_checkpoint(entry)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            skipped.append(str(e))
            older = [c for c in committed if c.step < entry.step]
            if older:
                log(f"checkpoint: step {entry.step} cannot be loaded ({e}); falling back to the previous "
                    f"committed checkpoint, step {older[-1].step}")
    raise CheckpointError(f"run {run_uri}: no committed checkpoint can be loaded:\n  " + "\n  ".join(skipped)
                          + "\nrestore the files, or start over under another run.name")


# What a rank sees when a peer of its process group died or hung mid-collective: gloo's transport
# errors arrive as plain RuntimeErrors, NCCL's as torch.distributed.DistError.
_PEER_LOST = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "NCCL communicator was aborted", "Socket Timeout", "timed out")


def is_peer_or_storage_loss(e: BaseException) -> bool:
    """A load that failed because a peer rank died or storage did not answer: the files may be
    fine, and the next attempt of the worker group loads them again."""
    import torch.distributed as dist

    for cause in error_chain(e):
        if isinstance(cause, (dist.DistError, ConnectionError, TimeoutError)):
            return True
        if any(marker in str(cause) for marker in _PEER_LOST):
            return True
    return False


def load_or_name_the_checkpoint(load: Callable[[], Any], checkpoint_uri: str) -> Any:
    """Run a DCP load; a failure from the files becomes a CheckpointError naming the checkpoint
    (DCP's own error says only which rank failed, often inside a wrapper that hides the file). A
    failure from a lost peer or storage is raised as it is: Ray Train retries those, and a
    CheckpointError would end the run over a checkpoint that is intact."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        return load()
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - whatever DCP raised: name the folder, keep the reason
        inner = find_raycpt_error(e)
        if inner is not None:
            raise inner from None
        if is_peer_or_storage_loss(e):
            raise
        problems = shard_problems(checkpoint_uri)
        reason = " ".join(str(e).split())[:300]
        found = f" ({'; '.join(problems)})" if problems else ""
        raise CheckpointError(f"checkpoint {checkpoint_uri} could not be loaded ({type(e).__name__}: {reason}); "
                              f"its files were damaged after it committed{found}: restore them, or remove its "
                              "COMMITTED marker to resume from the previous checkpoint") from None
