"""The worker loop, run by Ray Train on every worker. Reads top to bottom:

restore (automatic start decision) -> per step: batch, forward/backward with gradient
accumulation, clip, optimizer step; then maybe report and evaluate; commit a save once it is
durable on every rank; maybe checkpoint; a preemption notice or SIGTERM saves at the next step
boundary. The setup steps are the named functions below `run_worker`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from transformers import PretrainedConfig

from raycpt import storage
from raycpt.checkpoint.attempt import AttemptFence
from raycpt.checkpoint.dcp import Checkpointer, load_sharded
from raycpt.checkpoint.ray_records import RayRecords
from raycpt.checkpoint.resume import StartDecision, check_resume_config, decide_start
from raycpt.checkpoint.state import TrainState
from raycpt.config import ConfigError, JobConfig, parse_job
from raycpt.data.manifest import DataError, Manifest, tokenizer_identity
from raycpt.data.plan import remap_state_by_name
from raycpt.data.stream import DataStream, make_spec, read_manifests
from raycpt.data.verify import check_data_fits_model
from raycpt.model.fsdp import build_sharded_model
from raycpt.model.hf import load_config, load_tokenizer
from raycpt.model.lora import check_init_run, count_params, init_adapters, load_adapter, partial_training
from raycpt.model.loss import use_chunked_loss
from raycpt.train.evaluate import Evaluator, report_metrics
from raycpt.train.hooks import LoopHooks
from raycpt.train.logbook import MetricsLog
from raycpt.train.metrics import MetricWindow, device_peak_flops, eval_line, flops_per_token, progress_line
from raycpt.train.optim import build_optimizer, set_lr
from raycpt.train.rung_wait import RungWait
from raycpt.train.samples import SampleLog
from raycpt.train.schedule import lr_at
from raycpt.train.signals import StopFlag
from raycpt.train.step import StepClock, StepProfiler, forward_backward
from raycpt.train.worker import Worker, start_worker


def run_worker(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`."""
    job, hooks = parse_job(config["job"]), LoopHooks.from_options(config)
    rung_wait = RungWait.from_options(config)  # sweep trials under synchronous halving; else None
    storage.configure_storage(job.run.s3_endpoint_url)
    w = start_worker(hooks)
    decision = decide_start(job)
    fence = record_start(job, w, decision)
    model_config, tokenizer, manifests = check_inputs(job)
    model, optimizer = build_model(job, w, decision, model_config, hooks)
    evaluator = Evaluator.from_job(job, manifests, tokenizer, w.rank, w.world, w.device)  # train/evaluate.py
    evaluator.load_state_dict({"history": restore_train_state(job, w, decision)})
    stream = build_stream(job, w, decision, manifests, model_config.vocab_size, hooks)
    step, micro = decision.start_step, job.train.micro_batch_size
    accum = job.train.global_batch_size // w.world // micro
    w.say(evaluator.summary())
    checkpointer = Checkpointer(job.run_uri, w.rank, job.checkpoint.keep_last, job.checkpoint.keep_every_steps,
                                job.checkpoint.async_save, w.say, before_commit=hooks.before_commit(), fence=fence)
    records = RayRecords(w.ray_train, job)
    n_params, n_trainable = count_params(model)
    clock, stop = StepClock(w.device), StopFlag(w.ray_train)
    profiler = StepProfiler(list(hooks.profile) if hooks.profile else None, w.rank)
    window = MetricWindow(job, w.world, flops_per_token(n_params, model_config.num_hidden_layers,
                                                        model_config.hidden_size, job.data.seq_len, n_trainable),
                          device_peak_flops(w.device), clock, stream, checkpointer)
    use_chunked_loss(model, job.model.loss_chunk_tokens)
    mlog = MetricsLog(job.run_uri, job.run.name, step, w.rank, job.metrics.tensorboard, job.metrics.mlflow_tracking_uri,
                      job.metrics.mlflow_experiment, params={"peak_lr": job.optim.peak_lr,
                                                             "replay_ratio": job.data.replay_ratio},
                      wandb=job.metrics.wandb_init())
    samples = SampleLog(job.run_uri, job.train.log_sample_ids, w.rank, w.world, fence if w.rank == 0 else None)

    def evaluate() -> None:
        run_evals(job, w, model, evaluator, mlog, step)

    def save(reason: str) -> None:
        state = capture_train_state(job, w, step, stream, evaluator, reason)
        stall = checkpointer.save(step, model, optimizer, state)
        mlog.flush()
        w.say(f"checkpoint: step {step} ({reason}) saving, loop blocked {stall:.2f}s")
        records.report(checkpointer.last_committed_step)  # the previous save, committed by now
        samples.flush()
        hooks.after_save(step, w.rank, checkpointer, w.agree, w.timeline)

    stream.start()  # the reader starts while the step-0 evaluation runs
    if not evaluator.history:
        evaluate()
        w.timeline.mark("step0_eval", step)

    # ---- The loop --------------------------------------------------------------------------------
    w.say(f"training: {n_params / 1e6:.1f}M params on {w.world} {w.device.type} worker(s), global batch "
          f"{job.train.global_batch_size} x {job.data.seq_len} tokens, accum {accum}, "
          f"steps {step}->{job.train.max_steps}")
    clock.mark()
    first_step = step
    while step < job.train.max_steps:
        lr = lr_at(step, job.optim, job.train.max_steps)
        set_lr(optimizer, lr)
        input_ids, sample_ids = stream.next()

        loss_sum = forward_backward(model, input_ids, micro, w.device)  # raycpt/train/step.py; no host sync
        if job.train.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()
        step += 1
        profiler.step(step)
        window.step_done()
        if step == first_step + 1:
            w.timeline.mark("first_step", step, sync=True)
            # The optimizer state exists now: page-lock the async save's host buffers off the hot path.
            checkpointer.prepare_staging(model, optimizer)
        samples.add(step - 1, sample_ids)

        if window.due(step):
            metrics, step_times = window.report(step, loss_sum, accum, lr, grad_norm, w.device)
            w.say(progress_line(metrics))
            w.timeline.mark("progress", step)
            mlog.train(metrics)
            hooks.write_metrics(w.rank, metrics, step_times, w.attempt)
            # Not to Ray Train: each of its reports is a barrier of all ranks, and it takes one per
            # 2-s poll of the workers, so a report every step held the loop to 2 s a step.

        if (job.eval.interval_steps and step % job.eval.interval_steps == 0) or step == job.train.max_steps:
            evaluate()

        # A save in flight commits at the first step boundary after it is durable on every rank.
        records.report(checkpointer.poll_commit())
        hooks.at_step_end(step, w.rank, checkpointer, w.agree)

        # A preemption notice or SIGTERM (a barrier across workers, so only every few steps).
        stop_now = False
        if step % job.train.preemption_poll_steps == 0 or step == job.train.max_steps:
            stop_now = stop.poll(w.agree) and step < job.train.max_steps
        # A sweep trial also saves at each rung: if it is paused there, it resumes from that step.
        at_rung = rung_wait is not None and rung_wait.is_rung(step)
        if (step % job.checkpoint.interval_steps == 0 or stop_now or at_rung
                or (step == job.train.max_steps and job.checkpoint.final_save)):
            if stop_now:
                stop.set("another worker's stop request")
            save(stop.reason or ("final" if step == job.train.max_steps else "rung" if at_rung else "interval"))
        if rung_wait is not None and at_rung:
            w.timeline.mark("rung_reached", step)
            rung_wait.hold(step, w.rank, lambda: records.report(commit_now(checkpointer)), w.agree, w.say)
            w.timeline.mark("rung_passed", step)
        if stop_now:
            records.report(commit_now(checkpointer))
            if stop.train_on():
                # Ray's advice: save just in time and keep training; when the node goes, Ray Train
                # restarts the group and the run resumes from this checkpoint.
                w.say(f"preemption notice at step {step}: checkpoint committed, training on")
                continue
            # Raise rather than return: a returning run counts as finished for Ray Train and RayJob.
            raise RuntimeError(f"stopped at step {step} by {stop.reason}; "
                               "checkpoint committed, resubmit the job to resume")

    stream.close()
    checkpointer.close()
    records.report(checkpointer.last_committed_step)
    mlog.close()
    w.say(f"done at step {step}; tokens per source: {json.dumps(stream.tokens_per_source())}")


def commit_now(checkpointer: Checkpointer) -> int | None:
    """Wait for the in-flight save to commit; the step of the newest committed checkpoint."""
    checkpointer.wait()
    return checkpointer.last_committed_step


# ---- Setup, in the order run_worker calls it ------------------------------------------------------

def record_start(job: JobConfig, w: Worker, decision: StartDecision) -> AttemptFence:
    """Check a resume's config, claim the run folder for this attempt and record the start (for
    `raycpt status` and the fault tests); returns the fence rank 0 checks before it writes."""
    if decision.kind == "resume":
        allowed = check_resume_config(decision.train_state.config, job)
        if allowed:
            w.say(f"resume: intended config changes apply from here: {', '.join(allowed)}")
        ray_step = RayRecords(w.ray_train, job).recorded_step()
        if ray_step is not None and ray_step != decision.checkpoint.step:
            w.say(f"resume: Ray's record says step {ray_step}; the newest committed checkpoint in storage "
                  f"(step {decision.checkpoint.step}) wins")
    w.say(decision.message)
    fence = AttemptFence(job.run_uri, w.attempt)
    if w.rank == 0:
        fence.claim()
        storage.write_json(storage.join(job.run_uri, "metrics", "starts", f"{w.attempt}.json"), {
            "kind": decision.kind, "world_size": w.world, "wall_time": time.time(), "attempt": w.attempt,
            "step": decision.start_step, "checkpoint": decision.checkpoint.uri if decision.checkpoint else None,
            "saved_for": decision.train_state.reason if decision.kind == "resume" else None})
    return fence


def check_inputs(job: JobConfig) -> tuple[PretrainedConfig, Any, list[Manifest]]:
    """The model's config, its tokenizer and the sources' manifests, checked to fit together
    before any step."""
    if not job.model.base:
        raise DataError("model.base: needed for the model architecture and tokenizer")
    model_config = load_config(job.model.base)
    tokenizer = load_tokenizer(job.model.base)
    tok_id = tokenizer_identity(tokenizer, os.path.basename(job.model.base))
    manifests = read_manifests(job)
    # The driver's preflight read every shard footer; here only the cheap manifest checks.
    check_data_fits_model(job, manifests, tok_id, model_config.vocab_size, read_footers=False)
    return model_config, tokenizer, manifests


def build_model(job: JobConfig, w: Worker, decision: StartDecision, model_config: PretrainedConfig,
                hooks: LoopHooks) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded model and its optimizer, with the weights (and state) the start decision names."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(w.device.type, (w.world,))
    param_dtype = torch.bfloat16 if w.device.type == "cuda" and job.model.param_dtype == "bfloat16" else None
    model = build_sharded_model(
        model_config, mesh, w.device, param_dtype=param_dtype, attn_implementation=job.model.attn_implementation,
        activation_checkpointing=job.model.activation_checkpointing, compile_blocks=job.model.compile,
        # `random_weights` (raycpt bench train): the shape's architecture, no weights to read.
        weights_from=job.model.base if decision.kind == "fresh_base" and not hooks.random_weights else None,
        prepare=partial_training(job.model), single_worker=job.model.single_worker,
    )
    if decision.kind == "fresh_run":
        check_init_run(decision.train_state.config, job.model)
    if job.model.lora is not None and decision.kind == "fresh_base":
        init_adapters(model, job.run.seed)  # meta materialisation left them uninitialised
        if job.model.init.source == "adapter":
            load_adapter(model, job.model.init.adapter, job.model.lora)
            w.say(f"init: continuing the LoRA adapter {job.model.init.adapter} (optimizer fresh)")
    n_total, n_trainable = count_params(model)
    if n_trainable < n_total:
        w.say(f"partial training: {n_trainable / 1e6:.2f}M of {n_total / 1e6:.2f}M params trainable")
    optimizer = build_optimizer(model, job.optim, w.device)
    w.timeline.mark("model_built", None, sync=True)
    if decision.checkpoint is not None:
        load_sharded(decision.checkpoint.uri, model, optimizer if decision.load_optimizer else None)
    w.timeline.mark("model_ready", decision.start_step)
    return model, optimizer


def restore_train_state(job: JobConfig, w: Worker, decision: StartDecision) -> list[Any]:
    """The RNG (seeded on a fresh start) and the eval history a resume continues."""
    if decision.kind != "resume":
        torch.manual_seed(job.run.seed)
        return []
    ts = decision.train_state
    torch.set_rng_state(torch.tensor(ts.rng["torch"], dtype=torch.uint8))
    if ts.world_size != w.world:
        w.say(f"resume: {ts.world_size} workers wrote this checkpoint, {w.world} load it (resharded)")
    return list(ts.eval_history)


def build_stream(job: JobConfig, w: Worker, decision: StartDecision, manifests: list[Manifest], vocab_size: int,
                 hooks: LoopHooks) -> DataStream:
    """This worker's slices of every global batch, from the resumed data position."""
    if (job.train.global_batch_size // w.world) % job.train.micro_batch_size or job.train.global_batch_size % w.world:
        raise ConfigError(f"train.global_batch_size {job.train.global_batch_size} does not split into micro batches "
                          f"of train.micro_batch_size {job.train.micro_batch_size} on {w.world} workers")
    spec = make_spec(job, manifests, None, w.rank, w.world, vocab_size)
    stream = DataStream(spec, job.train.max_steps, job.data.prefetch_batches, job.data.reader_cpus,
                        local=hooks.local_stream)
    if decision.kind == "resume":
        ts, names = decision.train_state, [s.name for s in job.data.sources]
        if ts.source_names != names or "data.sources" in job.resume.allow_changes:
            stream.load_state_dict(remap_state_by_name(ts.data, ts.source_names, names).state_dict())
        else:
            stream.load_state_dict(ts.data)
    return stream


# ---- At named points of the loop ---------------------------------------------------------------

def run_evals(job: JobConfig, w: Worker, model: torch.nn.Module, evaluator: Evaluator, mlog: MetricsLog,
              step: int) -> None:
    """Held-out sources, probes and tasks at `step` (raycpt/train/evaluate.py); the record goes to
    the progress stream, the metrics logs, metrics/eval.json and Ray Train (`raycpt tune` scores it)."""
    record = evaluator.evaluate(model, step, final=step == job.train.max_steps)
    if record is None:
        return
    w.say(eval_line(record, evaluator.baseline))
    mlog.eval(record)
    if w.rank == 0:
        storage.write_json(storage.join(job.run_uri, "metrics", "eval.json"), evaluator.history)
    if w.ray_train is not None:
        w.ray_train.report({"step": step, **report_metrics(record)})


def capture_train_state(job: JobConfig, w: Worker, step: int, stream: DataStream, evaluator: Evaluator,
                        reason: str) -> TrainState:
    # A snapshot: an async save commits it later, after more evals may have been appended.
    return TrainState(
        step=step, data=stream.state_dict(), source_names=[s.name for s in job.data.sources],
        tokens_per_source=stream.tokens_per_source(), config=job.model_dump(mode="json"),
        config_fingerprint=job.fingerprint(), world_size=w.world, rng={"torch": torch.get_rng_state().tolist()},
        versions={"torch": torch.__version__}, wall_time=time.time(), reason=reason,
        eval_history=evaluator.state_dict()["history"])
