"""The staging buffers prepared ahead of the first async save have exactly the structure the
stager copies into, so a save through them writes the live values (LR included), not stale ones."""

from __future__ import annotations

import torch

from conftest import cpu_sharded_model, one_rank_group
from raycpt.checkpoint.dcp import same_layout, saved_state, staging_buffers_like
from raycpt.train.optim import build_optimizer


def test_prepared_buffers_take_a_staging_copy_of_model_and_optimizer(tmp_path, tiny_model):
    from torch.distributed._state_dict_utils import _copy_state_dict
    from torch.distributed.tensor import DTensor

    from raycpt.config import OptimConfig

    with one_rank_group(str(tmp_path / "store")):
        model = cpu_sharded_model(tiny_model, weights_from=tiny_model)
        optimizer = build_optimizer(model, OptimConfig(peak_lr=1e-3), torch.device("cpu"))
        x = torch.randint(0, 64, (2, 8))
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()  # the optimizer state exists from here on

        buffers = staging_buffers_like(saved_state(model, optimizer), pin=False)
        for group in optimizer.param_groups:
            group["lr"] = 0.123  # changes between preparing the buffers and the save
        live = saved_state(model, optimizer)
        staged = _copy_state_dict(live, buffers)

        def flat(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    yield from flat(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}", v

        live_flat, staged_flat = dict(flat(live)), dict(flat(staged))
        assert live_flat.keys() == staged_flat.keys()
        tensors = 0
        for key, value in live_flat.items():
            got = staged_flat[key]
            if isinstance(value, DTensor):
                assert isinstance(got, DTensor) and got.placements == value.placements
                assert got.to_local().device.type == "cpu"
                assert torch.equal(got.to_local(), value.to_local().cpu()), key
                assert got.to_local().data_ptr() != value.to_local().data_ptr(), key  # a copy
                tensors += 1
            elif isinstance(value, torch.Tensor):
                assert torch.equal(got, value.cpu()), key
        assert tensors > 10
        assert all(g["lr"] == 0.123 for g in staged["optimizer"]["param_groups"])

        # A layout change (here: one parameter without optimizer state) is detected before a copy.
        assert same_layout(live, buffers)
        fewer = {"model": live["model"], "optimizer": {**live["optimizer"], "state": dict(
            list(live["optimizer"]["state"].items())[1:])}}
        assert not same_layout(fewer, buffers)
        other_dtype = {**live, "model": {k: (v.to(torch.float64) if i == 0 else v)
                                         for i, (k, v) in enumerate(live["model"].items())}}
        assert not same_layout(other_dtype, buffers)


def test_bench_checkpoint_times_saves_and_leaves_nothing_behind(tmp_path):
    from raycpt.bench.checkpoint import bench_checkpoint

    rows = bench_checkpoint("tiny", str(tmp_path / "store"), saves=2, log=lambda m: None)
    assert [r["mode"] for r in rows] == ["sync", "async"]
    for r in rows:
        assert 0 < r["stall_s_median"] <= r["stall_s_max"] and r["persist_s_median"] > 0
        assert r["staging_buffers_s"] >= 0 and r["state_gib"] > 0
    assert list((tmp_path / "store").iterdir()) == []
