"""`raycpt bench data`: how fast one worker's stream delivers, with the blend and shuffle on.

Prints tokens/s, next-batch latency (median, p99) and time to first batch for the Ray Data
stream of one worker (rank 0 of `--workers`) over prepared shards, local or s3://.
"""

from __future__ import annotations

import time

import numpy as np

from raycpt.config import parse_job
from raycpt.data.stream import iter_local, iter_ray_data, make_spec, read_manifests


def bench_data(sources: list[str], steps: int, global_batch_size: int, workers: int, path: str = "ray",
               window_rows: int = 1024, s3_endpoint_url: str | None = None,
               step_time_s: float = 0.0) -> dict[str, float]:
    """With `step_time_s` > 0 the loop sleeps that long per batch, as training would, and the
    latencies are the time `next()` blocks (the data wait); with 0 it drains the stream flat out."""
    from raycpt import storage

    storage.configure_storage(s3_endpoint_url)
    manifests_probe = [{"name": f"s{i}", "path": p, "weight": 1.0} for i, p in enumerate(sources)]
    tree = {
        "run": {"name": "bench", "storage": "/tmp/raycpt-bench", "s3_endpoint_url": s3_endpoint_url},
        "model": {"base": "/unused"},
        "data": {"seq_len": 2, "sources": manifests_probe, "shuffle_window_rows": window_rows},
        "train": {"global_batch_size": global_batch_size, "max_steps": steps},
        "optim": {"peak_lr": 1e-4}, "checkpoint": {"interval_steps": steps},
    }
    job = parse_job(tree)
    manifests = read_manifests(job)
    job.data.seq_len = manifests[0].seq_len
    vocab = max(m.vocab_size for m in manifests)
    spec = make_spec(job, manifests, None, rank=0, world_size=workers, vocab_size=vocab)
    it = (iter_ray_data(spec, 0, steps, prefetch_batches=4, reader_cpus=0.25) if path == "ray"
          else iter_local(spec, 0, steps))
    t0 = time.perf_counter()
    latencies = []
    tokens = 0
    first = None
    last = t0
    for _step, ids, _sids in it:
        now = time.perf_counter()
        if first is None:
            first = now - t0
        else:
            latencies.append(now - last)  # paced: `last` is after the simulated step, so only the wait
        tokens += ids.size
        if step_time_s:
            time.sleep(step_time_s)
        last = time.perf_counter() if step_time_s else now
    total = last - t0 - (first or 0)
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "tokens_per_s": (tokens - tokens / steps) / max(total, 1e-9),
        "next_batch_median_ms": float(np.median(lat) * 1e3),
        "next_batch_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "first_batch_s": float(first or 0),
        "tokens_per_step_per_worker": tokens / steps,
    }
