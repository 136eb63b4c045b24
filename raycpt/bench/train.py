"""`raycpt bench train`: the real training path's speed next to a plain PyTorch loop.

The real path is exactly `raycpt train`: Ray Train's TorchTrainer, each worker's Ray Data stream
over Parquet shards, FSDP2, the chunked loss, checkpoints. The bench only supplies what a random
model needs: a model folder (config.json of a named shape and a word-level tokenizer over its
vocabulary) and random-token shards written in the prepared-shard format with that tokenizer's
identity, so the data checks of a real job pass. The workers start from random weights
(loop option `random_weights`), never reading a weights file.

The baseline is the same architecture as a plain transformers loop in this process, on one
device: fp32 weights, bf16 autocast, fused AdamW, full-vocabulary logits and HF's loss, eager or
`torch.compile(model)`, fed from tensors already on the device. A shape with a LoRA recipe
(raycpt.model.shapes.SHAPE_RECIPES) trains it on both sides: raycpt through `model.lora`, the
plain loop through peft's `get_peft_model` with the embeddings and head set trainable, at the
recipe's embedding LR ratio. Both are timed alike: CUDA events
at step boundaries, the first `warmup_steps` steps (compilation, allocator growth) left out.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from raycpt.model.lora import count_params
from raycpt.model.shapes import SHAPE_RECIPES, SHAPES, llama_config
from raycpt.train.metrics import device_peak_flops, flops_per_token
from raycpt.train.step import StepClock, peak_memory_gib


@dataclass
class TrainBenchOptions:
    shape: str
    workdir: str
    seq_len: int = 2048
    micro_batch_size: int = 8
    global_batch_size: int = 16
    steps: int = 40
    warmup_steps: int = 10
    workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int | None = None  # None: no saves
    baselines: tuple[str, ...] = ("compiled", "eager")
    overrides: list[str] = field(default_factory=list)  # dotted job overrides, e.g. model.compile=false
    profile_steps: tuple[int, int] | None = None  # profile these steps [start, stop) of rank 0
    baseline_micro_batch_size: int | None = None  # None: the real path's; halved on out-of-memory
    kill_at_step: int | None = None  # SIGKILL rank 0 once this step's checkpoint commits; time the resume
    layers: int | None = None  # decoder blocks instead of the shape's (memory plans of a large shape)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids are exactly 0..vocab_size-1 ("<i>"); id 0 is EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<0>", unk_token="<0>")


def write_model_folder(shape: str, folder: str, layers: int | None = None) -> str:
    """config.json of the shape + its synthetic tokenizer (no weights); kept if already there."""
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        return folder
    cfg = llama_config(shape, num_layers=layers)
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    synthetic_tokenizer(cfg.vocab_size).save_pretrained(folder)
    return folder


def write_random_source(folder: str, model_dir: str, rows: int, seq_len: int, seed: int = 0) -> str:
    """Random-token shards + manifest as `raycpt prepare` writes them, tied to `model_dir`'s tokenizer."""
    from raycpt import storage
    from raycpt.data.manifest import MANIFEST_NAME, split_record, tokenizer_identity, write_manifest
    from raycpt.data.prepare import write_rows
    from raycpt.model.hf import load_tokenizer

    manifest_uri = storage.join(folder, MANIFEST_NAME)
    fingerprint = f"random-{rows}x{seq_len}-{seed}"
    if storage.exists(manifest_uri) and storage.read_json(manifest_uri).get("input_fingerprint") == fingerprint:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tok_id = tokenizer_identity(load_tokenizer(model_dir), os.path.basename(model_dir))
    rng = np.random.default_rng(seed)
    write_rows(storage.join(folder, "train/part-00000.parquet"),
               rng.integers(0, tok_id["vocab_size"], (rows, seq_len), dtype=np.int32), seq_len, 64)
    write_manifest(folder, seq_len=seq_len, rows_per_row_group=64, tokenizer=tok_id,
                   train=split_record([{"path": "train/part-00000.parquet", "rows": rows}], rows * seq_len, rows),
                   eval=split_record([], 0, 0), input_fingerprint=fingerprint,
                   command="raycpt bench train (random tokens)")
    return folder


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def bench_job_tree(o: TrainBenchOptions, model_dir: str, source_dir: str) -> dict[str, Any]:
    from raycpt.config import apply_overrides

    tree = {
        "run": {"name": f"bench-{o.shape}-w{o.workers}", "storage": os.path.join(o.workdir, "runs"), "seed": 0},
        "model": {"base": model_dir, "compile": o.use_gpu},
        "data": {"seq_len": o.seq_len, "sources": [{"name": "random", "path": source_dir, "weight": 1.0}],
                 "shuffle_window_rows": 64},
        "train": {"global_batch_size": o.global_batch_size, "micro_batch_size": o.micro_batch_size,
                  "max_steps": o.steps, "log_interval_steps": min(10, o.steps)},
        "optim": {"peak_lr": 1e-4, "warmup_steps": min(10, o.steps)},
        "scaling": {"num_workers": o.workers, "use_gpu": o.use_gpu},
        # Saves only where asked (--checkpoint-every, --kill-at-step): a bench's checkpoints are
        # thrown away, and at 3B-8B a final save would write tens of GB after the timed steps.
        "checkpoint": {"interval_steps": o.checkpoint_every or o.kill_at_step or o.steps + 1, "keep_last": 1,
                       "final_save": False},
    }
    return apply_overrides(_merged(tree, SHAPE_RECIPES.get(o.shape, {})), list(o.overrides))


def run_real_path(o: TrainBenchOptions, model_dir: str, source_dir: str) -> dict[str, Any]:
    """`raycpt train` on the bench job; returns the rank-0 reports (one per log interval)."""
    from raycpt.config import parse_job
    from raycpt.launch import train

    job = parse_job(bench_job_tree(o, model_dir, source_dir))
    shutil.rmtree(os.path.join(job.run.storage, job.run.name), ignore_errors=True)  # never resume a bench
    metrics_file = os.path.join(o.workdir, f"{job.run.name}.metrics.jsonl")
    timeline_file = os.path.join(o.workdir, f"{job.run.name}.timeline.jsonl")
    for stale in (metrics_file, timeline_file):
        if os.path.exists(stale):
            os.remove(stale)
    t0 = time.perf_counter()
    loop_options: dict[str, Any] = {"random_weights": True, "metrics_file": metrics_file,
                                    "timeline_file": timeline_file}
    if o.kill_at_step:
        flag = os.path.join(o.workdir, f"{job.run.name}.kill")
        open(flag, "w").close()
        loop_options["kill_after_commit"] = [flag, o.kill_at_step]
    if o.profile_steps:
        loop_options["profile"] = [os.path.join(o.workdir, f"{job.run.name}.profile.txt"), *o.profile_steps]
    result = train(job, loop_options=loop_options)
    wall = time.perf_counter() - t0
    if getattr(result, "error", None):
        raise RuntimeError(f"bench train: the training run failed: {result.error}")
    with open(metrics_file) as f:
        reports = [json.loads(line) for line in f if line.strip()]
    with open(timeline_file) as f:
        timeline = [json.loads(line) for line in f if line.strip()]
    out = {"reports": reports, "wall_s": wall, "job": job, "timeline": timeline}
    # A bench keeps no checkpoints: at 3B and 8B they are tens of GB of a small disk.
    shutil.rmtree(os.path.join(job.run.storage, job.run.name), ignore_errors=True)
    if "profile" in loop_options and os.path.exists(loop_options["profile"][0]):
        with open(loop_options["profile"][0]) as f:
            out["profile"] = f.read()
    return out


def summarize_real(reports: list[dict[str, Any]], o: TrainBenchOptions, flops_tok: float,
                   peak: float | None, timeline: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    # A worker-group restart (Ray Train's FailureConfig) resumes from the last checkpoint and
    # reports steps again: time only the last attempt, and say that there was a restart. (An
    # attempt killed before its first report shows only in the timeline.)
    restarts = max(len({r["attempt"] for r in reports}),
                   sum(e["event"] == "worker_start" for e in timeline or [])) - 1
    reports = [r for r in reports if r["attempt"] == reports[-1]["attempt"]]
    # Warm-up counts from the attempt's first step (a resumed attempt compiles again).
    warm_until = reports[0]["step"] - len(reports[0]["step_times_s"]) + o.warmup_steps

    def profiled(s: int) -> bool:
        # Steps under the profiler run slower, and the step after them holds the trace export:
        # none of them is timed (`--profile START STOP`: steps START..STOP).
        return o.profile_steps is not None and o.profile_steps[0] <= s <= o.profile_steps[1]

    times: list[float] = []
    first = 0
    wait, stall, elapsed = 0.0, [], 0.0
    for r in reports:
        n = len(r["step_times_s"])
        steps = range(r["step"] - n, r["step"])
        kept = [t for s, t in zip(steps, r["step_times_s"]) if s >= warm_until and not profiled(s)]
        times += kept
        if r["step"] - n >= warm_until:  # whole window past warm-up
            wait += r["data_wait_share"] * sum(r["step_times_s"])
            elapsed += sum(r["step_times_s"])
        if r.get("checkpoint_stall_s"):
            stall.append(r["checkpoint_stall_s"])
        first = max(first, r["step"])
    out = _timing(times, o.global_batch_size * o.seq_len, flops_tok, peak, o.workers)
    out.update(peak_memory_gib=max((r.get("peak_memory_gib") or 0.0) for r in reports) or None,
               data_wait_share=wait / elapsed if elapsed else None,
               checkpoint_stall_s=max(stall) if stall else None, final_loss=reports[-1]["loss"],
               restarts=restarts)
    return out


def resume_timeline(timeline: list[dict[str, Any]]) -> dict[str, float] | None:
    """Seconds from the kill to each phase of the attempt that followed it: Ray Train restarting
    the worker group, the model built and the checkpoint loaded, the first new step done."""
    kills = [i for i, e in enumerate(timeline) if e["event"] == "kill"]
    if not kills:
        return None
    t_kill = timeline[kills[-1]]["time"]
    after = {e["event"]: e["time"] - t_kill for e in timeline[kills[-1] + 1:]}
    if "first_step" not in after:
        raise RuntimeError("bench train: the run did not take a step after the kill")
    return {"worker_start_s": after.get("worker_start"), "model_built_s": after.get("model_built"),
            "model_ready_s": after.get("model_ready"), "first_step_s": after["first_step"]}


def _timing(times: list[float], tokens_per_step: int, flops_tok: float, peak: float | None,
            devices: int) -> dict[str, Any]:
    if not times:
        raise RuntimeError("bench train: no timed steps; raise --steps above --warmup-steps")
    a = np.asarray(times)
    tps = tokens_per_step * len(a) / a.sum()  # every timed step, checkpoint saves included
    steady = tokens_per_step / float(np.median(a))
    return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / devices,
            "steady_tokens_per_s": steady, "mfu": tps * flops_tok / (peak * devices) if peak else None,
            "step_median_s": float(np.median(a)), "step_p90_s": float(np.percentile(a, 90)), "timed_steps": len(a)}


def plain_model(o: TrainBenchOptions, device: torch.device) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The shape as HF builds it (fp32, on the device), with the shape's LoRA recipe through peft;
    and its AdamW parameter groups (the recipe's embedding LR ratio)."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(o.shape, num_layers=o.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    recipe = SHAPE_RECIPES.get(o.shape, {})
    lora = recipe.get("model", {}).get("lora")
    if lora is None:
        return model, [{"params": list(model.parameters())}]
    from peft import LoraConfig, get_peft_model

    from raycpt.config import LoraConfig as RaycptLora

    spec = RaycptLora(**lora)
    embeddings = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                             target_modules=list(spec.target_modules), bias="none"))
    if spec.train_embeddings:
        for p in embeddings:
            p.requires_grad_(True)
    emb_ids = {id(p) for p in embeddings}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    ratio = recipe.get("optim", {}).get("embedding_lr_ratio", 1.0)
    groups = [{"params": rest}]
    if spec.train_embeddings:
        groups.append({"params": list({id(p): p for p in embeddings}.values()), "lr": 1e-4 * ratio})
    return model, groups


def plain_loop(o: TrainBenchOptions, compiled: bool, device: torch.device) -> dict[str, Any]:
    """One device, the worker's share of the global batch, gradient accumulation like the real path."""
    rows = o.global_batch_size // o.workers
    accum = rows // o.micro_batch_size
    cfg = llama_config(o.shape, num_layers=o.layers)
    model, groups = plain_model(o, device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    fwd = torch.compile(model) if compiled else model
    batches = [torch.randint(0, cfg.vocab_size, (o.micro_batch_size, o.seq_len), device=device) for _ in range(4)]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    clock.mark()
    loss = None
    for step in range(o.steps):
        for i in range(accum):
            x = batches[(step * accum + i) % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = fwd(input_ids=x, labels=x, use_cache=False).loss
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
    times = clock.read()[o.warmup_steps:]
    n_params, n_trainable = count_params(model)
    out = _timing(times, rows * o.seq_len, flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size,
                                                            o.seq_len, n_trainable),
                  device_peak_flops(device), 1)
    out.update(peak_memory_gib=peak_memory_gib(device), data_wait_share=None, checkpoint_stall_s=None,
               final_loss=float(loss.detach()) if loss is not None else None)
    del model, opt, fwd, batches, loss
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _plain_child(o: TrainBenchOptions, compiled: bool, device: str, queue) -> None:
    try:
        queue.put(plain_loop(o, compiled, torch.device(device)))
    except torch.OutOfMemoryError:
        queue.put({"oom": True})
    except Exception as e:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_plain_loop(o: TrainBenchOptions, compiled: bool, device: torch.device, log=print) -> dict[str, Any]:
    """The baseline in a fresh process, so neither run inherits the other's memory or compile
    caches; where the plain loop runs out of memory it halves its micro-batch (same global batch)."""
    import dataclasses
    import multiprocessing as mp

    micro = o.baseline_micro_batch_size or o.micro_batch_size
    while True:
        log(f"bench train: plain loop ({'compiled' if compiled else 'eager'}, micro-batch {micro}) on one "
            f"{device.type} device ...")
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        p = ctx.Process(target=_plain_child, args=(dataclasses.replace(o, micro_batch_size=micro), compiled,
                                                   str(device), queue))
        p.start()
        out = _wait_for(queue, p)
        p.join()
        if out.get("error"):
            raise RuntimeError(f"bench train: the plain loop failed: {out['error']}")
        if not out.get("oom"):
            return {**out, "micro_batch_size": micro}
        if micro == 1:
            raise RuntimeError("bench train: the plain loop runs out of memory even at micro-batch 1")
        micro //= 2


def _wait_for(queue, process) -> dict[str, Any]:
    import queue as queue_mod

    while True:
        try:
            return queue.get(timeout=5)
        except queue_mod.Empty:
            if not process.is_alive():
                raise RuntimeError(f"bench train: the plain loop died (exit code {process.exitcode})") from None


def bench_train(o: TrainBenchOptions, log=print) -> dict[str, Any]:
    from raycpt.config import ConfigError  # bad options exit 2 with the flag named, like a bad job

    if o.shape not in SHAPES:
        raise ConfigError(f"--shape: unknown {o.shape!r}; choose from {sorted(SHAPES)}")
    if o.global_batch_size % (o.workers * o.micro_batch_size):
        raise ConfigError(f"--global-batch-size {o.global_batch_size} must be a multiple of --workers x "
                          f"--micro-batch-size ({o.workers} x {o.micro_batch_size})")
    if o.kill_at_step is not None and not (0 < o.kill_at_step < o.steps and
                                           o.kill_at_step % (o.checkpoint_every or o.kill_at_step) == 0):
        raise ConfigError(f"--kill-at-step {o.kill_at_step}: must be a checkpoint step (a multiple of "
                          f"--checkpoint-every) between 0 and --steps {o.steps}")
    if o.layers is not None and o.layers <= 0:
        raise ConfigError(f"--layers {o.layers}: must be > 0")
    os.makedirs(o.workdir, exist_ok=True)
    layers_tag = f"-l{o.layers}" if o.layers else ""
    model_dir = write_model_folder(o.shape, os.path.join(o.workdir, f"model-{o.shape}{layers_tag}"), o.layers)
    rows = max(256, o.global_batch_size * 8)  # the plan cycles over them; speed does not depend on content
    source_dir = write_random_source(os.path.join(o.workdir, f"data-{o.shape}-{o.seq_len}"), model_dir, rows,
                                     o.seq_len)
    cfg = llama_config(o.shape, num_layers=o.layers)
    device = torch.device("cuda", 0) if o.use_gpu else torch.device("cpu")
    peak = device_peak_flops(device)
    real = run_real_path(o, model_dir, source_dir)
    flops_tok = _real_flops_per_token(real["job"], cfg, o.seq_len)
    results: dict[str, Any] = {"raycpt": summarize_real(real["reports"], o, flops_tok, peak, real["timeline"])}
    results["raycpt"]["wall_s"] = real["wall_s"]
    results["raycpt"]["resume_after_kill"] = resume_timeline(real["timeline"])
    if real.get("profile"):
        results["raycpt"]["profile"] = real["profile"]
    for kind in o.baselines:
        results[f"plain_{kind}"] = run_plain_loop(o, kind == "compiled", device, log)
    per = results["raycpt"]["tokens_per_s_per_device"]
    steady = results["raycpt"]["steady_tokens_per_s"] / o.workers
    ratios = {k: {"all_steps": per / v["tokens_per_s"], "median_step": steady / v["steady_tokens_per_s"]}
              for k, v in results.items() if k != "raycpt"}
    device_name = torch.cuda.get_device_name(device) if o.use_gpu else "cpu"
    return {"options": {**asdict(o), "baselines": list(o.baselines)}, "device": device_name,
            "flops_per_token": flops_tok, "peak_flops": peak, "job": real["job"].model_dump(mode="json"),
            "results": results, "ratios_per_device": ratios,
            "versions": {"torch": torch.__version__, **_versions()}}


def _real_flops_per_token(job, cfg, seq_len: int) -> float:
    """FLOPs per token of the model the real path trained (its LoRA recipe included), from a meta build."""
    from raycpt.model.hf import build_on_meta
    from raycpt.model.lora import partial_training

    model = build_on_meta(cfg)
    prepare = partial_training(job.model)
    if prepare is not None:
        model = prepare(model)
    n_params, n_trainable = count_params(model)
    return flops_per_token(n_params, cfg.num_hidden_layers, cfg.hidden_size, seq_len, n_trainable)


def _versions() -> dict[str, str]:
    import ray
    import transformers

    return {"transformers": transformers.__version__, "ray": ray.__version__}


def format_report(r: dict[str, Any]) -> str:
    o = r["options"]
    layers = f" ({o['layers']} layers)" if o.get("layers") else ""
    lines = [f"bench train: {o['shape']}{layers}, seq {o['seq_len']}, global batch {o['global_batch_size']} "
             f"(micro {o['micro_batch_size']}), {o['workers']} worker(s) on {r['device']}, "
             f"{o['steps']} steps ({o['warmup_steps']} warm-up not timed), "
             f"{r['flops_per_token'] / 1e9:.2f} GFLOP/token",
             f"{'path':<36}{'tokens/s':>11}{'per dev':>10}{'median':>9}{'MFU':>7}{'step med':>10}{'p90':>8}"
             f"{'peak mem':>10}"
             f"{'data wait':>10}{'ckpt stall':>11}"]
    names = {"raycpt": "raycpt train (Ray Train)", "plain_compiled": "plain loop, torch.compile",
             "plain_eager": "plain loop, eager"}
    devs = o["workers"]
    for k, v in r["results"].items():
        mfu = f"{v['mfu'] * 100:.1f}%" if v.get("mfu") is not None else "-"
        mem = f"{v['peak_memory_gib']:.1f}G" if v.get("peak_memory_gib") else "-"
        wait = f"{v['data_wait_share'] * 100:.2f}%" if v.get("data_wait_share") is not None else "-"
        stall = f"{v['checkpoint_stall_s']:.2f}s" if v.get("checkpoint_stall_s") is not None else "-"
        name = names.get(k, k) + (f" (micro {v['micro_batch_size']})" if "micro_batch_size" in v else "")
        lines.append(f"{name:<36}{v['tokens_per_s']:>11,.0f}{v['tokens_per_s_per_device']:>10,.0f}"
                     f"{v['steady_tokens_per_s'] / (devs if k == 'raycpt' else 1):>9,.0f}"
                     f"{mfu:>7}{v['step_median_s'] * 1e3:>8.0f}ms{v['step_p90_s'] * 1e3:>6.0f}ms{mem:>10}"
                     f"{wait:>10}{stall:>11}")
    if r["results"]["raycpt"].get("restarts"):
        lines.append(f"note: the training run restarted {r['results']['raycpt']['restarts']} time(s); "
                     "only its last attempt is timed")
    resume = r["results"]["raycpt"].get("resume_after_kill")
    if resume:
        lines.append(f"resume after SIGKILL of rank 0 at step {o['kill_at_step']}: first new step done "
                     f"{resume['first_step_s']:.1f}s after the kill (workers restarted at "
                     f"{resume['worker_start_s']:.1f}s, model built at {resume['model_built_s']:.1f}s, "
                     "checkpoint loaded at "
                     f"{resume['model_ready_s']:.1f}s)")
    for k, ratio in r["ratios_per_device"].items():
        lines.append(f"raycpt / {names.get(k, k)}, tokens/s per device: {ratio['all_steps']:.3f}x over all timed "
                     f"steps (saves included), {ratio['median_step']:.3f}x at the median step")
    return "\n".join(lines)
