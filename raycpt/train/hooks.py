"""Test and benchmark hooks of the worker loop, parsed once from the loop options.

`raycpt train` passes none of these; `raycpt bench train` and the fault tests pass them through
`launch.train(..., loop_options=...)`. The loop calls the hooks at named points (a step's end, after
a save) and never reads the options itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from raycpt.checkpoint.dcp import Checkpointer

Agree = Callable[[bool], bool]  # True on every rank when any rank passes True


@dataclass(frozen=True)
class LoopHooks:
    # JSON lines of the attempt's phases on rank 0 (raycpt bench train times a resume with them).
    timeline_file: str | None = None
    # JSON lines of every report's metrics plus each step's time (raycpt bench train).
    metrics_file: str | None = None
    # [flag_file, step]: while the flag exists, rank 0 SIGKILLs itself once that step's save committed.
    kill_after_commit: tuple[str, int] | None = None
    # [flag_file, step]: while the flag exists, rank 0 dies in that step's save, shards written, no marker.
    kill_before_commit: tuple[str, int] | None = None
    # [flag_file, step]: while the flag exists, every rank waits at that step's end until the in-flight
    # save is durable (not committed); at the next step's end, after the loop's commit poll, rank 0
    # SIGKILLs itself: a worker lost between a save's durability and the next save.
    kill_after_durable: tuple[str, int] | None = None
    # The model shape's architecture with random weights, no weights file read (raycpt bench train).
    random_weights: bool = False
    # Read batches in the worker's process instead of through Ray Data (per-rank tests).
    local_stream: bool = False
    # [path, start_step, stop_step]: torch.profiler table of those steps on rank 0.
    profile: tuple[str, int, int] | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "LoopHooks":
        """The hooks among a `train_loop_config` (its other keys, e.g. `job`, are not hooks)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names - {"job", "rung_wait"})  # rung_wait: raycpt/train/rung_wait.py
        if unknown:  # a misspelt hook would silently do nothing, and its test pass for the wrong reason
            raise ValueError(f"loop options: unknown {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in names and v}
        return cls(**values)

    # -- fault injection ---------------------------------------------------------------------------
    def before_commit(self) -> Callable[[int], None] | None:
        """The Checkpointer's `before_commit` callback for `kill_before_commit` (None without it)."""
        if not self.kill_before_commit:
            return None
        flag, at_step = self.kill_before_commit

        def hook(step: int) -> None:
            if step == at_step and os.path.exists(flag):
                os.remove(flag)
                say_now(f"fault injection: killing this worker during the save of step {step}")
                os._exit(137)

        return hook

    def after_save(self, step: int, rank: int, checkpointer: Checkpointer, agree: Agree,
                   timeline: "Timeline") -> None:
        if not self.kill_after_commit:
            return
        flag, at_step = self.kill_after_commit
        if step == at_step and agree(rank == 0 and os.path.exists(flag)):
            checkpointer.wait()
            if rank == 0:
                os.remove(flag)
                timeline.mark("kill", step)
                say_now(f"fault injection: SIGKILL to this worker after the commit of step {step}")
                os.kill(os.getpid(), signal.SIGKILL)

    def at_step_end(self, step: int, rank: int, checkpointer: Checkpointer, agree: Agree) -> None:
        if not self.kill_after_durable:
            return
        flag, at_step = self.kill_after_durable
        if step == at_step and agree(rank == 0 and os.path.exists(flag)):
            checkpointer.wait_durable()
        elif step == at_step + 1 and rank == 0 and os.path.exists(flag):
            os.remove(flag)
            say_now(f"fault injection: SIGKILL to this worker at the end of step {step}, "
                    f"last commit step {checkpointer.last_committed_step}")
            os.kill(os.getpid(), signal.SIGKILL)

    # -- benchmark records -------------------------------------------------------------------------
    def timeline(self, rank: int, device: torch.device) -> "Timeline":
        return Timeline(self.timeline_file if rank == 0 else None, device)

    def write_metrics(self, rank: int, metrics: dict[str, Any], step_times: list[float], attempt: str) -> None:
        if rank == 0 and self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps({**metrics, "step_times_s": step_times, "attempt": attempt}) + "\n")


class Timeline:
    """Wall-clock marks of an attempt's phases, appended as JSON lines to `path` (None: off)."""

    def __init__(self, path: str | None, device: torch.device):
        self.path, self.device = path, device

    def mark(self, event: str, step: int | None, sync: bool = False) -> None:
        if self.path is None:
            return
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per attempt: the step has really run
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "step": step, "time": time.time()}) + "\n")


def say_now(msg: str) -> None:
    # Straight to stdout: Ray Train patches print() to tee into its logger, which doubles lines.
    sys.stdout.write(f"[raycpt] {msg}\n")
    sys.stdout.flush()
