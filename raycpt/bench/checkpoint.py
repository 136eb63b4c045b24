"""`raycpt bench checkpoint`: how long a save blocks the training loop (stall) and how long until
it is durable and committed (persist), sync vs async, to a local folder or s3://.

One process, world size 1 (gloo), the named model shape with random weights built as one
training worker builds it (raycpt.model.fsdp), and a full AdamW state (exp_avg, exp_avg_sq: 3x
the fp32 weights in all), saved through the same `Checkpointer` that training uses.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist


def bench_checkpoint(shape: str, storage_uri: str, saves: int = 3, modes: tuple[str, ...] = ("sync", "async"),
                     s3_endpoint_url: str | None = None, log=print) -> list[dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    from raycpt import storage
    from raycpt.checkpoint.dcp import Checkpointer
    from raycpt.checkpoint.layout import list_checkpoints
    from raycpt.checkpoint.state import standalone_train_state
    from raycpt.model.fsdp import build_sharded_model
    from raycpt.model.shapes import llama_config

    storage.configure_storage(s3_endpoint_url)
    owns_group = not dist.is_initialized()
    if owns_group:
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="raycpt-bench-"), "store"), 1)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", store=store,
                                rank=0, world_size=1)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        model = build_sharded_model(llama_config(shape), init_device_mesh(device.type, (1,)), device, param_dtype=None,
                                    attn_implementation="sdpa", activation_checkpointing=False,
                                    compile_blocks=False, weights_from=None)
        with torch.no_grad():
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)  # each rank its own shard
                p.grad = torch.zeros_like(p)
        # The state a save holds is what matters, not training's parameter groups: one AdamW.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        optimizer.step()  # materialises the AdamW moments
        state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
        log(f"bench checkpoint: {shape}, {state_bytes / 2**30:.2f} GiB of weights + AdamW state -> {storage_uri}")
        rows = []
        for mode in modes:
            run_uri = storage.join(storage_uri, f"bench-{shape}-{mode}-{time.time_ns()}")
            ckpt = Checkpointer(run_uri, 0, keep_last=1, keep_every_steps=None, async_save=mode == "async",
                                log=lambda m: None)
            # As in training: the pinned staging buffers are allocated off the loop before the
            # first save (on GPUs; a no-op otherwise). Timed apart from the saves.
            t0 = time.perf_counter()
            ckpt.prepare_staging(model, optimizer)
            ckpt.wait_for_staging_buffers()
            prepare_s = time.perf_counter() - t0
            stalls, persists = [], []
            try:
                for step in range(1, saves + 1):
                    t0 = time.perf_counter()
                    stalls.append(ckpt.save(step, model, optimizer, standalone_train_state(step, "bench")))
                    ckpt.wait()
                    persists.append(time.perf_counter() - t0)
                assert [e.step for e in list_checkpoints(run_uri) if e.committed] == [saves]
            finally:
                try:
                    ckpt.close()
                finally:
                    storage.remove_tree(run_uri)  # a bench leaves nothing behind, also when a save failed
            row = {"shape": shape, "mode": mode, "storage": "s3" if storage_uri.startswith("s3://") else "local",
                   "staging_buffers_s": prepare_s,
                   "state_gib": state_bytes / 2**30, "stall_s_median": statistics.median(stalls),
                   "stall_s_max": max(stalls), "persist_s_median": statistics.median(persists),
                   "persist_gib_per_s": state_bytes / 2**30 / statistics.median(persists)}
            log(f"  {mode:5s} stall {row['stall_s_median']:.2f}s (max {row['stall_s_max']:.2f}s), persisted and "
                f"committed in {row['persist_s_median']:.2f}s ({row['persist_gib_per_s']:.2f} GiB/s)")
            rows.append(row)
        return rows
    finally:
        if owns_group:
            dist.destroy_process_group()
