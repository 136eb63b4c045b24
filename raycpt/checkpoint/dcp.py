"""Sharded save and load with torch.distributed.checkpoint, straight to storage.

Every rank writes its own shards in parallel (local folder or s3:// through fsspec); DCP's
coordinator writes `.metadata` once all ranks are done; then rank 0 writes `train_state.json`
and the commit marker. With `async_save`, the state is staged to host memory and persisted by a
background thread on a separate gloo group while training goes on; at most one save is in
flight (a new save first waits for the previous one). The loop calls `poll_commit` at every step
boundary: once every rank's upload is durable, the save commits there, not at the next save, so a
worker lost in between resumes from it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from raycpt import storage
from raycpt.checkpoint.attempt import AttemptFence
from raycpt.checkpoint.integrity import load_or_name_the_checkpoint
from raycpt.checkpoint.layout import COMMIT_MARKER, list_checkpoints, step_uri, to_delete
from raycpt.checkpoint.state import TrainState, write_train_state

_WRITE_THREADS = 8


def storage_writer(uri: str):
    """The DCP writer of a checkpoint folder (local, or s3:// through fsspec)."""
    if storage.is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        endpoint = os.environ.get("RAYCPT_S3_ENDPOINT_URL")
        kwargs = {"endpoint_url": endpoint} if endpoint and uri.startswith("s3://") else {}
        # Several objects per rank, uploaded by parallel threads: object stores are fast in
        # aggregate, slow per stream, and a multi-GB single object is fragile to upload.
        return FsspecWriter(uri, sync_files=False, thread_count=_WRITE_THREADS, **kwargs)
    return dcp.FileSystemWriter(storage.local_path(uri), sync_files=True, thread_count=_WRITE_THREADS)


def storage_reader(uri: str):
    """The DCP reader of a checkpoint folder (local, or s3:// through fsspec); `.metadata` goes
    through a restricted unpickler: a crafted checkpoint must not run code."""
    from raycpt.checkpoint.metadata import safe_reader

    return safe_reader(uri, os.environ.get("RAYCPT_S3_ENDPOINT_URL"))


def _pinned_stager():
    """A stager that keeps one pinned host copy of the state across saves: staging is then one
    device-to-host copy at full bandwidth (no allocation of tens of GB of pageable memory per save),
    and it is synchronous, so no copy competes with the next steps."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    return BlockingAsyncStager(cache_staged_state_dict=True)


def staging_buffers_like(obj: Any, pin: bool = True) -> Any:
    """Empty pinned host buffers in the structure of a state dict, as the stager caches them.

    torch's own first-stage path copies every tensor to pageable memory and then again into
    pinned memory; only the allocation is needed, since each save copies into the buffers."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict):
        return {k: staging_buffers_like(v, pin) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(staging_buffers_like(v, pin) for v in obj)
    if isinstance(obj, DTensor):
        if obj.dim() == 0:
            return obj
        local = obj.to_local()
        ret = torch.empty_like(obj, device="cpu")  # a DTensor with a lazily allocated local tensor
        ret._local_tensor = staging_buffers_like(local, pin)
        return ret
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return torch.tensor(0, dtype=obj.dtype)
        if obj.numel() == 0:
            return torch.zeros_like(obj, device="cpu")
        return torch.empty(tuple(obj.size()), dtype=obj.dtype, pin_memory=pin)
    return obj


def same_layout(state: Any, buffers: Any) -> bool:
    """Whether `buffers` (from `staging_buffers_like`) can take a staging copy of `state`: the same
    keys and list lengths, and tensors of the same local shape and dtype where `state` has tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return (isinstance(buffers, dict) and state.keys() == buffers.keys()
                and all(same_layout(v, buffers[k]) for k, v in state.items()))
    if isinstance(state, (list, tuple)):
        return (isinstance(buffers, (list, tuple)) and len(state) == len(buffers)
                and all(same_layout(a, b) for a, b in zip(state, buffers)))
    if isinstance(state, torch.Tensor):
        if not isinstance(buffers, torch.Tensor):
            return False
        a = state.to_local() if isinstance(state, DTensor) else state
        b = buffers.to_local() if isinstance(buffers, DTensor) else buffers
        return a.shape == b.shape and a.dtype == b.dtype
    return True


def model_state(model: nn.Module) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def saved_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint holds, as DCP saves it (and as the stager's buffers mirror it)."""
    return {"model": model_state(model), "optimizer": optimizer_state(model, optimizer)}


def load_sharded(uri: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load model (and optimizer) shards from a committed checkpoint; DCP reshards to any world size."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state: dict[str, Any] = {"model": model_state(model)}
    if optimizer is not None:
        state["optimizer"] = optimizer_state(model, optimizer)
    load_or_name_the_checkpoint(lambda: dcp.load(state, storage_reader=storage_reader(uri)), uri)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


class Checkpointer:
    """Writes checkpoints of one run; `commit` callbacks run on rank 0 once a save is durable."""

    def __init__(self, run_uri: str, rank: int, keep_last: int, keep_every_steps: int | None,
                 async_save: bool, log: Callable[[str], None] = print,
                 before_commit: Callable[[int], None] | None = None, fence: AttemptFence | None = None):
        self.run_uri = run_uri
        self.rank = rank
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps
        self.async_save = async_save
        self.log = log
        self.pending: Future | None = None
        self.pending_step: int | None = None
        self._pending_state: TrainState | None = None
        self.last_committed_step: int | None = None
        self.blocked_s = 0.0  # seconds the training loop spent in save() and poll_commit(), all told
        # Fault tests hook in here to die with every shard written but no commit marker.
        self.before_commit = before_commit
        # Background saves talk on their own group so they never interleave with training collectives.
        self.pg = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        # `poll_commit`'s per-step agreement: a CPU all-reduce on a third group (no device sync,
        # never interleaved with the background save's collectives on `pg`).
        self.poll_pg = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        # Every rank checks it is still the run's newest attempt before it writes shards, and rank 0
        # again before it commits or deletes anything (one small read each).
        self.fence = fence
        # On GPUs the staging copy goes into pinned host buffers reused across saves. (On CPU the
        # default stager copies into fresh memory; pinning needs an accelerator.)
        self.stager = _pinned_stager() if async_save and torch.cuda.is_available() else None
        self._preparing: threading.Thread | None = None

    def prepare_staging(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Allocate the pinned staging buffers in a background thread, so the first save of an
        attempt does not stall the loop while tens of GB are page-locked. Call once the optimizer
        state exists (after the first step); a save that comes first waits for it."""
        # Only a stager that caches its buffers (`state_dict_cache`: None until made); else nothing to do.
        if getattr(self.stager, "state_dict_cache", False) is not None:
            return
        state = saved_state(model, optimizer)

        def allocate() -> None:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    self.stager.state_dict_cache = staging_buffers_like(state)
            except Exception as e:  # noqa: BLE001 - the stager then allocates at the first save
                self.log(f"checkpoint: pinned staging buffers not prepared ({type(e).__name__}: {e}); "
                         "the first save allocates them")
                return
            self.log(f"checkpoint: pinned staging buffers ready in {time.perf_counter() - t0:.1f}s")

        self._preparing = threading.Thread(target=allocate, name="raycpt-pin-staging", daemon=True)
        self._preparing.start()

    def wait_for_staging_buffers(self) -> None:
        """Block until `prepare_staging`'s allocation (if one is running) is done."""
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             train_state: TrainState) -> float:
        """Start (or do) a save of `step`; returns the seconds the training loop was blocked."""
        t0 = time.perf_counter()
        self.wait()
        self.wait_for_staging_buffers()
        uri = step_uri(self.run_uri, step)
        self._check_fence(f"write the shards of step {step}")
        if self.rank == 0 and storage.exists(uri):
            # A save of this step from before a restart: torn (maybe by another world size), or
            # committed but damaged, which the resume fell back past. This attempt resumed from an
            # earlier step, so the folder is stale either way: marker first, so that no reader
            # takes it for committed halfway. No rank writes before DCP's planning collective,
            # which waits for rank 0.
            self._check_fence(f"remove the stale save {uri}")
            marker = storage.join(uri, COMMIT_MARKER)
            if storage.exists(marker):
                storage.remove_tree(marker)
            storage.remove_tree(uri)
        state = saved_state(model, optimizer)
        cache = getattr(self.stager, "state_dict_cache", None)
        if cache is not None and not same_layout(state, cache):
            # The state's layout changed since the buffers were made (a parameter got optimizer
            # state late): this save allocates new ones rather than fail on the mismatch.
            self.log("checkpoint: the state changed layout; re-allocating the pinned staging buffers")
            self.stager.state_dict_cache = None
        if self.async_save:
            kwargs = {"async_stager": self.stager} if self.stager is not None else {}
            fut = dcp.async_save(state, storage_writer=storage_writer(uri), process_group=self.pg, **kwargs)
            if not isinstance(fut, Future):  # newer torch returns a response object
                fut.staging_completion.result()  # the copy must be ours before the weights change
                fut = fut.upload_completion
            self.pending, self.pending_step = fut, step
            self._pending_state = train_state
        else:
            dcp.save(state, storage_writer=storage_writer(uri))
            self._commit(step, train_state)
        self.blocked_s += time.perf_counter() - t0
        return time.perf_counter() - t0

    def poll_commit(self) -> int | None:
        """At a step boundary, on every rank: commit the in-flight save if every rank's upload is
        durable (one tiny CPU all-reduce, only while a save is in flight); returns the step committed."""
        if self.pending is None:
            return None
        uploading = torch.tensor([0.0 if self.pending.done() else 1.0])
        if self.poll_pg is not None:
            dist.all_reduce(uploading, op=dist.ReduceOp.MAX, group=self.poll_pg)
        if uploading.item() > 0:
            return None
        step = self.pending_step
        self.blocked_s += self.wait()  # the marker, the train state and retention: small writes
        return step

    def wait_durable(self) -> None:
        """Block until this rank's in-flight upload (if any) is on storage, without committing it."""
        if self.pending is not None:
            self.pending.result()

    def wait(self) -> float:
        """Block until the in-flight save (if any) is durable and committed."""
        if self.pending is None:
            return 0.0
        t0 = time.perf_counter()
        self.pending.result()
        step, state = self.pending_step, self._pending_state
        self.pending, self.pending_step = None, None
        self._commit(step, state)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the last save and free the staging buffers."""
        self.wait()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def _commit(self, step: int, train_state: TrainState) -> None:
        # Every rank's shards are on storage once DCP returns on all ranks; the barrier makes
        # rank 0's marker strictly later than every rank's last write.
        if dist.is_initialized():
            dist.barrier(group=self.pg)
        if self.rank == 0:
            if self.before_commit is not None:
                self.before_commit(step)
            uri = step_uri(self.run_uri, step)
            self._check_fence(f"commit step {step}")
            write_train_state(uri, train_state)
            storage.write_bytes(storage.join(uri, COMMIT_MARKER), f"{step}\n".encode())
            self.apply_retention()
        self.last_committed_step = step
        self.log(f"checkpoint: step {step} committed -> {step_uri(self.run_uri, step)}")

    def apply_retention(self) -> None:
        entries = list_checkpoints(self.run_uri)
        doomed = to_delete(entries, self.keep_last, self.keep_every_steps, self.pending_step)
        if doomed:
            self._check_fence(f"delete {', '.join(e.uri for e in doomed)}")
        for e in doomed:
            storage.remove_tree(e.uri)

    def _check_fence(self, action: str) -> None:
        if self.fence is not None:
            self.fence.check(action)
