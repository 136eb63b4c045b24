"""`raycpt` command line: prepare | train | status | export | import | schedule | demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from raycpt.config import ConfigError


def _cmd_prepare(a: argparse.Namespace) -> int:
    from raycpt.data.prepare import PrepareOptions, prepare
    from raycpt.launch import connect_ray

    connect_ray(address=a.address)
    prepare(PrepareOptions(inputs=tuple(a.input), tokenizer_dir=a.tokenizer, seq_len=a.seq_len, output=a.output,
                           text_column=a.text_column, eval_fraction=a.eval_fraction,
                           group_bytes=int(a.group_mb * (1 << 20)), rows_per_row_group=a.rows_per_row_group))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from raycpt.config import load_job
    from raycpt.launch import train

    job = load_job(a.job, a.overrides)
    result = train(job, address=a.address)
    if getattr(result, "error", None):
        print(f"raycpt train: run {job.run.name} failed: {result.error}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    from raycpt.status import format_status, run_status

    target = a.target
    if target.endswith((".yaml", ".yml")) and os.path.exists(target):
        from raycpt.config import load_job

        job = load_job(target, a.overrides)
        from raycpt import storage

        storage.configure_storage(job.run.s3_endpoint_url)
        target = job.run_uri
    st = run_status(target)
    print(json.dumps(st, indent=1) if a.json else format_status(st))
    return 0 if st["latest_step"] is not None else 3


def _cmd_import(a: argparse.Namespace) -> int:
    from raycpt.model.hf import import_gguf

    print(import_gguf(a.gguf, a.output))
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from raycpt.checkpoint.export import export_hf

    print(export_hf(a.run, a.output, base=a.base))
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


def _cmd_bench_data(a: argparse.Namespace) -> int:
    from raycpt.bench import bench_data
    from raycpt.launch import connect_ray

    if a.path == "ray":
        connect_ray(address=a.address)
    r = bench_data(a.source, a.steps, a.global_batch_size, a.workers, path=a.path,
                   window_rows=a.shuffle_window_rows, s3_endpoint_url=a.s3_endpoint_url)
    print(f"stream ({a.path}) per worker of {a.workers}: {r['tokens_per_s']:,.0f} tokens/s | next batch median "
          f"{r['next_batch_median_ms']:.2f} ms, p99 {r['next_batch_p99_ms']:.2f} ms | first batch "
          f"{r['first_batch_s']:.2f} s | {r['tokens_per_step_per_worker']:,.0f} tokens per step per worker")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from raycpt.demo import run_demo

    return run_demo(workdir=a.workdir, overrides=a.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycpt", description="Elastic continued pretraining on Ray.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="text -> packed Parquet token shards + manifest (Ray Data)")
    s.add_argument("--input", nargs="+", required=True, help="files, folders or globs; local or s3://")
    s.add_argument("--tokenizer", required=True, help="HF folder with the base model's tokenizer")
    s.add_argument("--seq-len", type=int, required=True, help="tokens per packed row")
    s.add_argument("--output", required=True, help="output folder or s3:// prefix")
    s.add_argument("--text-column", default="text", help="text field of jsonl / Parquet inputs")
    s.add_argument("--eval-fraction", type=float, default=0.0, help="share of documents held out for eval")
    s.add_argument("--group-mb", type=float, default=8.0, help="input MB per prepare task")
    s.add_argument("--rows-per-row-group", type=int, default=64, help="Parquet row-group size in rows")
    s.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    s.set_defaults(fn=_cmd_prepare)

    s = sub.add_parser("train", help="run (or resume) a job")
    s.add_argument("job", help="job YAML")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    s.add_argument("--address", default=None)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("status", help="latest committed step, tokens per source, checkpoints, eval")
    s.add_argument("target", help="job YAML or run folder URI")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    s = sub.add_parser("import", help="GGUF file -> HF folder usable as model.base")
    s.add_argument("gguf")
    s.add_argument("--output", required=True)
    s.set_defaults(fn=_cmd_import)

    s = sub.add_parser("export", help="run or checkpoint -> HF folder for serving")
    s.add_argument("run", help="run folder URI or one of its checkpoint folders")
    s.add_argument("--output", required=True)
    s.add_argument("--base", default=None, help="HF folder for config/tokenizer (default: the run's model.base)")
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("schedule", help="print the LR curve of a job before launching it")
    s.add_argument("job")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--points", type=int, default=21)
    s.set_defaults(fn=_cmd_schedule)

    s = sub.add_parser("bench", help="benchmarks: `bench data` (the stream)")
    bench = s.add_subparsers(dest="what", required=True)
    b = bench.add_parser("data", help="tokens/s and next-batch latency of one worker's stream")
    b.add_argument("--source", nargs="+", required=True, help="prepared source folders or s3:// URIs")
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--global-batch-size", type=int, default=64)
    b.add_argument("--workers", type=int, default=1, help="the stream of rank 0 of this many workers")
    b.add_argument("--shuffle-window-rows", type=int, default=1024)
    b.add_argument("--path", choices=("ray", "local"), default="ray", help="through Ray Data, or in-process")
    b.add_argument("--s3-endpoint-url", default=None)
    b.add_argument("--address", default=None)
    b.set_defaults(fn=_cmd_bench_data)

    s = sub.add_parser("demo", help="continue SmolLM2-135M on Python source with English replay, on CPU")
    s.add_argument("--workdir", default=os.environ.get("RAYCPT_DEMO_DIR", ".raycpt-demo"))
    s.add_argument("overrides", nargs="*", help="dotted overrides of jobs/demo.yaml")
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"raycpt {args.cmd}: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        from raycpt.checkpoint.resume import ResumeError
        from raycpt.data.manifest import DataError
        from raycpt.storage import StorageError

        if isinstance(e, (DataError, ResumeError, StorageError, FileNotFoundError)):
            print(f"raycpt {args.cmd}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
