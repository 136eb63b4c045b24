"""The worker loop, run by Ray Train on every worker. Reads top to bottom:

restore (automatic start decision) -> per step: batch, forward/backward with gradient
accumulation, clip, optimizer step; then maybe report, evaluate, checkpoint; a preemption notice
or SIGTERM saves at the next step boundary.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raycpt import storage
from raycpt.checkpoint.dcp import Checkpointer, load_sharded
from raycpt.checkpoint.layout import step_uri
from raycpt.checkpoint.resume import TRAIN_STATE_VERSION, check_resume_config, decide_start
from raycpt.config import JobConfig, parse_job
from raycpt.data.manifest import DataError, tokenizer_identity
from raycpt.data.plan import remap_state_by_name
from raycpt.data.verify import check_data_fits_model
from raycpt.data.stream import (WaitTimer, build_plan, iter_local, iter_ray_data, make_spec, read_eval_rows,
                                read_manifests)
from raycpt.model.fsdp import build_sharded_model
from raycpt.model.hf import load_config, load_tokenizer, param_count
from raycpt.model.loss import use_chunked_loss
from raycpt.model.lora import check_init_run, count_params, init_adapters, load_adapter, partial_training
from raycpt.train.evaluate import eval_losses, forgetting
from raycpt.train.logbook import MetricsLog
from raycpt.train.metrics import device_peak_flops, eval_line, flops_per_token, progress_line
from raycpt.train.optim import build_optimizer, set_lr
from raycpt.train.schedule import lr_at
from raycpt.train.step import StepClock, StepProfiler, forward_backward, peak_memory_gib
from raycpt.train.signals import sigterm_requested


class StopFlag:
    """Why the loop should save at the next step boundary: a Ray preemption notice (save and
    train on) or SIGTERM on this worker (save and stop)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason


def _say(msg: str) -> None:
    # Straight to stdout: Ray Train patches print() to tee into its logger, which doubles lines.
    sys.stdout.write(f"[raycpt] {msg}\n")
    sys.stdout.flush()


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _ray_context():
    try:
        import ray.train

        ray.train.get_context()
        return ray.train
    except Exception:  # noqa: BLE001 - outside Ray Train (unit tests, torchrun)
        return None


def run_worker(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`."""
    job = parse_job(config["job"])
    storage.configure_storage(job.run.s3_endpoint_url)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    ray_train = _ray_context()
    say = _say if rank == 0 else (lambda msg: None)
    stop = StopFlag()
    timeline = Timeline(config.get("timeline_file") if rank == 0 else None, device)
    timeline.mark("worker_start", None)

    # ---- The start decision -------------------------------------------------------------------
    decision = decide_start(job)
    if decision.kind == "resume":
        allowed = check_resume_config(decision.train_state["config"], job)
        if allowed:
            say(f"resume: intended config changes apply from here: {', '.join(allowed)}")
        ray_step = _ray_recorded_step(ray_train)
        if ray_step is not None and ray_step != decision.checkpoint.step:
            say(f"resume: Ray's record says step {ray_step}; the newest committed checkpoint in storage "
                f"(step {decision.checkpoint.step}) wins")
    say(decision.message)
    attempt_id = time.time_ns()
    if rank == 0:  # every (re)start of the run, for `raycpt status` and the fault tests
        storage.write_json(storage.join(job.run_uri, "metrics", "starts", f"{attempt_id}.json"), {
            "kind": decision.kind, "world_size": world, "wall_time": time.time(),
            "step": int(decision.train_state["step"]) if decision.kind == "resume" else 0,
            "checkpoint": decision.checkpoint.uri if decision.checkpoint else None,
            "saved_for": decision.train_state.get("reason") if decision.kind == "resume" else None})

    # ---- Data and model must fit together before any step ---------------------------------------
    model_config = load_config(job.model.base) if job.model.base else None
    if model_config is None:
        raise DataError("model.base: needed for the model architecture and tokenizer")
    tok_id = tokenizer_identity(load_tokenizer(job.model.base), os.path.basename(job.model.base))
    manifests = read_manifests(job)
    # The driver's preflight read every shard footer; here only the cheap manifest checks.
    check_data_fits_model(job, manifests, tok_id, model_config.vocab_size, read_footers=False)

    # ---- Model, optimizer, restore ------------------------------------------------------------
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    param_dtype = torch.bfloat16 if device.type == "cuda" and job.model.param_dtype == "bfloat16" else None
    model = build_sharded_model(
        model_config, mesh, device, param_dtype=param_dtype, attn_implementation=job.model.attn_implementation,
        activation_checkpointing=job.model.activation_checkpointing, compile_blocks=job.model.compile,
        # `random_weights` (raycpt bench train): the shape's architecture, no weights to read.
        weights_from=job.model.base if decision.kind == "fresh_base" and not config.get("random_weights") else None,
        prepare=partial_training(job.model), single_worker=job.model.single_worker,
    )
    if decision.kind == "fresh_run":
        check_init_run(decision.train_state["config"], job.model)
    if job.model.lora is not None and decision.kind == "fresh_base":
        init_adapters(model, job.run.seed)  # meta materialisation left them uninitialised
        if job.model.init.source == "adapter":
            load_adapter(model, job.model.init.adapter, job.model.lora)
            say(f"init: continuing the LoRA adapter {job.model.init.adapter} (optimizer fresh)")
    n_total, n_trainable = count_params(model)
    if n_trainable < n_total:
        say(f"partial training: {n_trainable / 1e6:.2f}M of {n_total / 1e6:.2f}M params trainable")
    optimizer = build_optimizer(model, job.optim, device)
    timeline.mark("model_built", None, sync=True)
    if decision.checkpoint is not None:
        load_sharded(decision.checkpoint.uri, model, optimizer if decision.load_optimizer else None)
    timeline.mark("model_ready", decision.train_state["step"] if decision.kind == "resume" else 0)

    source_names = [s.name for s in job.data.sources]
    if decision.kind == "resume":
        ts = decision.train_state
        step = int(ts["step"])
        if ts["source_names"] != source_names or "data.sources" in job.resume.allow_changes:
            plan_state = remap_state_by_name(ts["data"], ts["source_names"], source_names).state_dict()
        else:
            plan_state = ts["data"]
        eval_history: list[dict[str, Any]] = ts.get("eval_history", [])
        torch.set_rng_state(torch.tensor(ts["rng"]["torch"], dtype=torch.uint8))
        if ts["world_size"] != world:
            say(f"resume: {ts['world_size']} workers wrote this checkpoint, {world} load it (resharded)")
    else:
        step, plan_state, eval_history = 0, None, []
        torch.manual_seed(job.run.seed)

    # ---- The stream of this worker's slices ---------------------------------------------------
    rows_per_worker = job.train.global_batch_size // world
    micro = job.train.micro_batch_size
    if rows_per_worker % micro:
        raise ValueError(f"train.global_batch_size {job.train.global_batch_size} / {world} workers is not a "
                         f"multiple of train.micro_batch_size {micro}")
    accum = rows_per_worker // micro
    spec = make_spec(job, manifests, plan_state, rank, world, model_config.vocab_size)
    plan = build_plan(spec)  # lock-step copy: tokens per source and the checkpointed position
    if config.get("local_stream"):
        batches = iter_local(spec, step, job.train.max_steps)
    else:
        batches = iter_ray_data(spec, step, job.train.max_steps, job.data.prefetch_batches, job.data.reader_cpus)
    eval_rows = {s.name: read_eval_rows(m, job.eval.max_rows) for s, m in zip(job.data.sources, manifests)}
    if rank == 0 and not any(len(r) for r in eval_rows.values()):
        say("eval: no held-out rows in any source (prepare with --eval-fraction); evaluation is off")

    checkpointer = Checkpointer(job.run_uri, rank, job.checkpoint.keep_last, job.checkpoint.keep_every_steps,
                                job.checkpoint.async_save, say, before_commit=_fault_hook(config))
    n_params = param_count(model)
    flops_tok = flops_per_token(n_params, model_config.num_hidden_layers, model_config.hidden_size, job.data.seq_len)
    peak = device_peak_flops(device)
    timer = WaitTimer()
    clock = StepClock(device)
    profiler = StepProfiler(config.get("profile"), rank)
    use_chunked_loss(model, job.model.loss_chunk_tokens)
    mlog = MetricsLog(job.run_uri, job.run.name, step, rank, job.metrics.tensorboard, job.metrics.mlflow_tracking_uri,
                      job.metrics.mlflow_experiment, params={"peak_lr": job.optim.peak_lr,
                                                             "replay_ratio": job.data.replay_ratio})
    sample_log: list[dict[str, Any]] = []

    def train_state() -> dict[str, Any]:
        # A snapshot: an async save commits it later, after more evals may have been appended.
        return {
            "format_version": TRAIN_STATE_VERSION, "step": step, "data": plan.state.state_dict(),
            "source_names": source_names, "tokens_per_source": plan.tokens_per_source(job.data.seq_len),
            "config": job.model_dump(mode="json"), "config_fingerprint": job.fingerprint(), "world_size": world,
            "rng": {"torch": torch.get_rng_state().tolist()}, "eval_history": list(eval_history),
            "versions": {"torch": torch.__version__}, "wall_time": time.time(),
        }

    def evaluate() -> None:
        losses = eval_losses(model, eval_rows, rank, world, micro, device)
        if not losses:
            return
        base = eval_history[0]["loss"] if eval_history else losses
        replay = [s.name for s in job.data.sources if s.role == "replay"]
        record = {"step": step, "loss": losses, "forgetting": {k: v for k, v in forgetting(losses, base).items()
                                                                 if k in replay}}
        eval_history.append(record)
        say(eval_line(step, losses, base))
        mlog.eval(record)
        if rank == 0:
            storage.write_json(storage.join(job.run_uri, "metrics", "eval.json"), eval_history)
        if ray_train is not None:  # `raycpt tune` scores trials on these (raycpt/tune/objective.py)
            ray_train.report({"step": step, **{f"eval/loss/{k}": v for k, v in losses.items()},
                              **{f"eval/forgetting/{k}": v for k, v in record["forgetting"].items()}})

    def save(reason: str) -> float:
        stall = checkpointer.save(step, model, optimizer, {**train_state(), "reason": reason})
        mlog.flush()
        say(f"checkpoint: step {step} ({reason}) saving, loop blocked {stall:.2f}s")
        return stall

    reported_step: list[int | None] = [None]

    def report_commit() -> None:
        """Record each newly committed checkpoint with Ray Train (ray.train.get_checkpoint after a
        restart); storage stays the authority on what is committed."""
        done = checkpointer.last_committed_step
        if ray_train is not None and done is not None and done != reported_step[0]:
            _report_checkpoint(ray_train, job, done)
            reported_step[0] = done

    if not eval_history:
        evaluate()

    # ---- The loop --------------------------------------------------------------------------------
    say(f"training: {n_params / 1e6:.1f}M params on {world} {device.type} worker(s), global batch "
        f"{job.train.global_batch_size} x {job.data.seq_len} tokens, accum {accum}, steps {step}->{job.train.max_steps}")
    window_t0, window_wait0, window_steps, ckpt_stall = time.perf_counter(), timer.wait_s, 0, 0.0
    clock.mark()
    preemption_saved = False
    first_step = step
    kill_after_commit = config.get("kill_after_commit")  # raycpt bench train --kill-at-step
    while step < job.train.max_steps:
        lr = lr_at(step, job.optim, job.train.max_steps)
        set_lr(optimizer, lr)
        data_step, input_ids, sample_ids = timer.next(batches)
        if data_step != step:
            raise RuntimeError(f"data stream at step {data_step}, training at {step}")
        plan.next_batch()

        loss_sum = forward_backward(model, input_ids, micro, device)  # raycpt/train/step.py; no host sync
        if job.train.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()
        step += 1
        profiler.step(step)
        window_steps += 1
        if step == first_step + 1:
            timeline.mark("first_step", step, sync=True)
            # The optimizer state exists now: page-lock the async save's host buffers off the hot path.
            checkpointer.prepare_staging(model, optimizer)

        if job.train.log_sample_ids:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, sample_ids.tolist())
            if rank == 0:
                sample_log.append({"step": step - 1, "ids": [i for part in gathered for i in part]})

        # -- report
        if step % job.train.log_interval_steps == 0 or step == job.train.max_steps:
            mean_loss = loss_sum / accum
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
            if device.type != "cuda":
                mean_loss /= world
            # Read the step clock first: it waits for the device, which runs behind the host, so
            # the window's wall time covers its steps' work, not just their launch.
            step_times = clock.read()
            elapsed = time.perf_counter() - window_t0
            tokens = window_steps * job.train.global_batch_size * job.data.seq_len
            tps = tokens / max(elapsed, 1e-9)
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            metrics = {
                "step": step, "max_steps": job.train.max_steps, "loss": float(mean_loss), "lr": lr,
                "grad_norm": float(gn), "tokens_per_s": tps,
                "mfu": (tps * flops_tok / (peak * world)) if peak else None,
                "data_wait_share": (timer.wait_s - window_wait0) / max(elapsed, 1e-9),
                "checkpoint_stall_s": ckpt_stall,
                "step_time_median_s": float(np.median(step_times)) if step_times else None,
                "step_time_p90_s": float(np.percentile(step_times, 90)) if step_times else None,
                "peak_memory_gib": peak_memory_gib(device),
                "eta_s": (job.train.max_steps - step) * elapsed / window_steps,
                **{f"tokens/{k}": v for k, v in plan.tokens_per_source(job.data.seq_len).items()},
            }
            say(progress_line(metrics))
            mlog.train(metrics)
            if rank == 0 and config.get("metrics_file"):  # raycpt bench train reads every step's time
                with open(config["metrics_file"], "a") as f:
                    f.write(json.dumps({**metrics, "step_times_s": step_times, "attempt": attempt_id}) + "\n")
            if ray_train is not None:
                ray_train.report({k: v for k, v in metrics.items() if v is not None})
            window_t0, window_wait0, window_steps, ckpt_stall = time.perf_counter(), timer.wait_s, 0, 0.0

        # -- evaluate
        if (job.eval.interval_steps and step % job.eval.interval_steps == 0) or step == job.train.max_steps:
            evaluate()

        # -- preemption notice or SIGTERM (a barrier across workers, so only every few steps)
        stop_now = False
        if step % job.train.preemption_poll_steps == 0 or step == job.train.max_steps:
            if ray_train is not None and ray_train.get_preemption_info() is not None and not preemption_saved:
                stop.set("preemption notice")
                preemption_saved = True  # one just-in-time save per notice
            if sigterm_requested():
                stop.set("SIGTERM")
            stop_now = _agree(stop.reason is not None, device) and step < job.train.max_steps

        # -- checkpoint
        if (step % job.checkpoint.interval_steps == 0 or stop_now
                or (step == job.train.max_steps and job.checkpoint.final_save)):
            if stop_now and stop.reason is None:
                stop.set("another worker's stop request")
            reason = stop.reason or ("final" if step == job.train.max_steps else "interval")
            ckpt_stall += save(reason)
            report_commit()  # the previous save, committed by now when saves are async
            if job.train.log_sample_ids and rank == 0:
                _append_sample_log(job.run_uri, sample_log)
                sample_log.clear()
            if kill_after_commit and step == kill_after_commit[1] and _agree(
                    rank == 0 and os.path.exists(kill_after_commit[0]), device):
                checkpointer.wait()
                if rank == 0:
                    os.remove(kill_after_commit[0])
                    timeline.mark("kill", step)
                    _say(f"fault injection: SIGKILL to this worker after the commit of step {step}")
                    os.kill(os.getpid(), signal.SIGKILL)
        if stop_now:
            checkpointer.wait()
            report_commit()
            if stop.reason == "preemption notice":
                # Ray's advice: save just in time and keep training; when the node goes, Ray Train
                # restarts the group and the run resumes from this checkpoint.
                say(f"preemption notice at step {step}: checkpoint committed, training on")
                stop.reason = None
                continue
            # Raise rather than return: a returning run counts as finished for Ray Train and RayJob.
            raise RuntimeError(f"stopped at step {step} by {stop.reason}; "
                               "checkpoint committed, resubmit the job to resume")

    checkpointer.close()
    report_commit()
    mlog.close()
    say(f"done at step {step}; tokens per source: {json.dumps(plan.tokens_per_source(job.data.seq_len))}")


class Timeline:
    """Wall-clock marks of an attempt's phases, appended as JSON lines to the loop option
    `timeline_file` on rank 0 (raycpt bench train times a resume after a kill with them)."""

    def __init__(self, path: str | None, device: torch.device):
        self.path, self.device = path, device

    def mark(self, event: str, step: int | None, sync: bool = False) -> None:
        if self.path is None:
            return
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per attempt: the step has really run
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "step": step, "time": time.time()}) + "\n")


def _fault_hook(config: dict[str, Any]):
    """Tests of torn saves pass `kill_before_commit: [flag_file, step]`: while the flag file exists,
    the save of that step dies after every shard is written and before the commit marker."""
    spec = config.get("kill_before_commit")
    if not spec:
        return None
    flag, at_step = spec

    def hook(step: int) -> None:
        if step == at_step and os.path.exists(flag):
            os.remove(flag)
            _say(f"fault injection: killing this worker during the save of step {step}")
            os._exit(137)

    return hook


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank wants to stop (one tiny all-reduce per step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _append_sample_log(run_uri: str, entries: list[dict[str, Any]]) -> None:
    """Audit log of the sample ids trained per step (tests of resume equivalence read it)."""
    if not entries:
        return
    name = f"steps-{entries[0]['step']:08d}-{entries[-1]['step']:08d}.json"
    storage.write_json(storage.join(run_uri, "samples", name), entries)


RAY_RECORDS = "ray-checkpoints"  # under the run folder; Ray Train owns and prunes these
_POINTER = "raycpt_checkpoint.json"


def _report_checkpoint(ray_train, job: JobConfig, step: int) -> None:
    """Tell Ray Train about a committed checkpoint; every rank calls this at the same point, as
    Ray Train's report requires. Ray is given a small pointer folder, not the checkpoint itself:
    Ray prunes what it records (CheckpointConfig.num_to_keep) and refuses to resume a run whose
    recorded checkpoints are gone, while raycpt's own retention decides which checkpoints stay."""
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = None
    if dist.get_rank() == 0:
        pointer = storage.join(job.run_uri, RAY_RECORDS, f"step-{step:08d}")
        storage.write_json(storage.join(pointer, _POINTER), {"step": step, "uri": step_uri(job.run_uri, step)})
        fs = ray_train.get_context().get_storage().storage_filesystem
        path = pointer.split("://", 1)[-1] if storage.is_remote(pointer) else storage.local_path(pointer)
        checkpoint = Checkpoint(path=path, filesystem=fs)
    ray_train.report({"step": step, "tokens": step * job.train.global_batch_size * job.data.seq_len},
                     checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _ray_recorded_step(ray_train) -> int | None:
    """The step of the checkpoint Ray Train hands this (restarted) run, if any."""
    if ray_train is None or ray_train.get_checkpoint() is None:
        return None
    try:
        with ray_train.get_checkpoint().as_directory() as d:
            with open(os.path.join(d, _POINTER)) as f:
                return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError):
        return None
