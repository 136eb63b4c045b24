"""One worker trains the plain module (no FSDP2); its checkpoints reshard to two FSDP2 workers
and back, model and AdamW state alike; the optimizer picks its fused path on GPUs; the bench
shapes parse. Everything on CPU (gloo), the tiny shape."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import one_rank_group

# Runs one rank of a 2-rank gloo group: loads the 1-worker checkpoint into FSDP2, checks every
# value against the 1-worker reference, takes one step and saves for the way back.
TWO_RANKS = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from raycpt.checkpoint.dcp import load_sharded, saved_state
    from raycpt.config import OptimConfig
    from raycpt.model.fsdp import build_sharded_model, is_sharded
    from raycpt.model.hf import load_config
    from raycpt.train.optim import build_optimizer

    rank, store, model_dir, ckpt_in, ckpt_out, ref = sys.argv[1:]
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=int(rank), world_size=2)
    model = build_sharded_model(load_config(model_dir), init_device_mesh("cpu", (2,)), torch.device("cpu"),
                                param_dtype=None, attn_implementation="sdpa", activation_checkpointing=False,
                                compile_blocks=False, weights_from=None)
    assert is_sharded(model)
    optimizer = build_optimizer(model, OptimConfig(peak_lr=1e-3), torch.device("cpu"))
    load_sharded(ckpt_in, model, optimizer)
    expect = torch.load(ref)
    state = saved_state(model, optimizer)
    for k, v in state["model"].items():
        assert isinstance(v, DTensor) and torch.equal(v.full_tensor(), expect["model"][k]), k
    for k, s in state["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"].full_tensor(), expect["exp_avg"][k]), k
    x = torch.arange(16).reshape(2, 8) % 64
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    optimizer.step()
    state = saved_state(model, optimizer)
    full = {"model": {k: v.full_tensor() for k, v in state["model"].items()},
            "exp_avg": {k: s["exp_avg"].full_tensor() for k, s in state["optimizer"]["state"].items()}}
    dcp.save(state, checkpoint_id=ckpt_out)
    if rank == "0":
        torch.save(full, ref + ".back")
    dist.destroy_process_group()
""")


def _one_worker(model_dir: str, weights_from: str | None):
    from torch.distributed.device_mesh import init_device_mesh

    from raycpt.config import OptimConfig
    from raycpt.model.fsdp import build_sharded_model
    from raycpt.model.hf import load_config
    from raycpt.train.optim import build_optimizer

    model = build_sharded_model(load_config(model_dir), init_device_mesh("cpu", (1,)), torch.device("cpu"),
                                param_dtype=None, attn_implementation="sdpa", activation_checkpointing=False,
                                compile_blocks=False, weights_from=weights_from)
    return model, build_optimizer(model, OptimConfig(peak_lr=1e-3), torch.device("cpu"))


def _full(state: dict) -> dict:
    return {"model": {k: v.detach().clone() for k, v in state["model"].items()},
            "exp_avg": {k: s["exp_avg"].clone() for k, s in state["optimizer"]["state"].items()}}


def test_one_worker_checkpoint_reshards_to_two_fsdp2_workers_and_back(tmp_path, tiny_model):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from raycpt.checkpoint.dcp import load_sharded, saved_state
    from raycpt.model.fsdp import is_sharded

    x = torch.arange(16).reshape(2, 8) % 64
    with one_rank_group(str(tmp_path / "store1")):
        model, optimizer = _one_worker(tiny_model, weights_from=tiny_model)
        assert not is_sharded(model) and not any(isinstance(p, DTensor) for p in model.parameters())
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        optimizer.step()
        state = saved_state(model, optimizer)
        # The names a checkpoint holds are the base model's, as under FSDP2.
        assert "model.embed_tokens.weight" in state["model"] and "model.layers.0.mlp.up_proj.weight" in state["model"]
        torch.save(_full(state), tmp_path / "ref.pt")
        dcp.save(state, checkpoint_id=str(tmp_path / "w1"))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(r), str(tmp_path / "store2"), tiny_model,
                               str(tmp_path / "w1"), str(tmp_path / "w2"), str(tmp_path / "ref.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)

    # Back to one worker: the two workers' checkpoint loads into the plain module, every value equal.
    expect = torch.load(tmp_path / "ref.pt.back")
    with one_rank_group(str(tmp_path / "store3")):
        model, optimizer = _one_worker(tiny_model, weights_from=None)
        load_sharded(str(tmp_path / "w2"), model, optimizer)
        got = _full(saved_state(model, optimizer))
    assert got["model"].keys() == expect["model"].keys() and got["exp_avg"].keys() == expect["exp_avg"].keys()
    for k, v in expect["model"].items():
        assert torch.equal(got["model"][k], v), k
    for k, v in expect["exp_avg"].items():
        assert torch.equal(got["exp_avg"][k], v), k
    # Tied embeddings stay tied after the load.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_one_worker_holds_a_small_model_plain_and_a_large_one_under_fsdp2():
    from raycpt.model.fsdp import PLAIN_BELOW_PARAMS, shards

    small, large = 135_000_000, 1_236_000_000
    assert small < PLAIN_BELOW_PARAMS <= large
    assert not shards(1, "auto", small) and shards(1, "auto", large)
    assert shards(1, "fsdp2", small) and not shards(1, "plain", large)
    assert all(shards(2, mode, small) for mode in ("auto", "plain", "fsdp2"))  # several workers: always FSDP2


def test_adamw_is_fused_on_gpus_and_foreach_elsewhere():
    from raycpt.config import OptimConfig
    from raycpt.train.optim import adamw_implementation, build_optimizer

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_implementation(cpu) == "foreach"
    assert adamw_implementation([]) == "foreach"
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(peak_lr=1e-3), torch.device("cpu"))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    if torch.cuda.is_available():
        opt = build_optimizer(torch.nn.Linear(2, 2).cuda(), OptimConfig(peak_lr=1e-3), torch.device("cuda"))
        assert opt.defaults["fused"] is True
        mixed = [torch.nn.Parameter(torch.zeros(3, device="cuda")), cpu[0]]
        assert adamw_implementation(mixed) == "foreach"


def test_one_worker_mixed_precision_trains_fp32_weights_through_the_chunked_loss(tmp_path, tiny_model):
    """bf16 autocast around every forward (CPU autocast here, as on a GPU), the chunked head run
    in bf16, gradients on the fp32 weights; the loss within bf16 rounding of the fp32 model's."""
    from torch.distributed.device_mesh import init_device_mesh

    from raycpt.model.fsdp import build_sharded_model
    from raycpt.model.hf import load_config
    from raycpt.model.loss import use_chunked_loss

    x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = {}
    with one_rank_group(str(tmp_path / "store")):
        for dtype in (None, torch.bfloat16):
            model = build_sharded_model(load_config(tiny_model), init_device_mesh("cpu", (1,)), torch.device("cpu"),
                                        param_dtype=dtype, attn_implementation="sdpa",
                                        activation_checkpointing=False, compile_blocks=False,
                                        weights_from=tiny_model)
            assert use_chunked_loss(model, chunk_tokens=8)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                       for p in model.parameters())
            assert not torch.is_autocast_enabled("cpu")  # the hooks left autocast after the forward
            losses[dtype] = float(loss.detach())
    assert abs(losses[torch.bfloat16] - losses[None]) < 0.05 * losses[None]
    assert losses[torch.bfloat16] != losses[None]  # it did compute in bf16


@pytest.mark.parametrize("shape,layers,tied", [("llama-3b", 28, True), ("llama3-8b", 32, False),
                                               ("llama3-8b-lora", 32, False)])
def test_bench_shapes_parse(shape, layers, tied):
    from raycpt.model.shapes import SHAPE_RECIPES, llama_config

    cfg = llama_config(shape)
    assert cfg.num_hidden_layers == layers and cfg.tie_word_embeddings is tied and cfg.vocab_size == 128256
    assert llama_config(shape, num_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError):
        llama_config(shape, num_layers=0)
    if shape.endswith("-lora"):
        from raycpt.config import LoraConfig, OptimConfig

        recipe = SHAPE_RECIPES[shape]
        assert LoraConfig(**recipe["model"]["lora"]).train_embeddings
        assert OptimConfig(peak_lr=1e-4, **recipe["optim"]).embedding_lr_ratio == 0.1


def test_bench_job_of_the_lora_shape_carries_its_recipe():
    from raycpt.bench.train import TrainBenchOptions, bench_job_tree
    from raycpt.config import parse_job

    o = TrainBenchOptions(shape="llama3-8b-lora", workdir="/tmp/unused", overrides=["model.lora.rank=8"])
    job = parse_job(bench_job_tree(o, "/tmp/unused/model", "/tmp/unused/data"))
    assert job.model.lora is not None and job.model.lora.rank == 8 and job.model.lora.alpha == 32.0
    assert job.optim.embedding_lr_ratio == 0.1


def test_plain_lora_baseline_trains_adapters_and_embeddings_at_the_recipe_lr():
    """The bench's plain peft loop for the LoRA shape (built on the meta device: no memory)."""
    from raycpt.bench.train import TrainBenchOptions, plain_model

    o = TrainBenchOptions(shape="llama3-8b-lora", workdir="/tmp/unused", layers=1)
    model, groups = plain_model(o, torch.device("meta"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    assert not any(".base_layer." in n for n in trainable)
    rest, embeddings = groups
    assert embeddings["lr"] == 1e-4 * 0.1 and len(embeddings["params"]) == 2  # untied embeddings and head
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_one_fsdp2_worker_casts_its_weights_once_a_step_however_many_micro_batches(tmp_path, tiny_model,
                                                                                 monkeypatch):
    """One FSDP2 worker keeps its unsharded weights between a step's micro-batches (one all-gather
    per parameter group a step, not one per micro-batch), and the gradients are those of the step."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from conftest import cpu_sharded_model
    from raycpt.train.step import forward_backward

    rows = (torch.arange(4 * 16).reshape(4, 16) * 7 % 64).numpy()
    with one_rank_group(str(tmp_path / "store")):
        model = cpu_sharded_model(tiny_model, weights_from=None)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        gathers = []
        group_unshard = _fsdp_param_group.FSDPParamGroup.unshard

        def counted_unshard(group, *args, **kwargs):  # FSDP2 casting a parameter group's weights in
            was_unsharded = group.is_unsharded
            group_unshard(group, *args, **kwargs)
            if not was_unsharded and group._all_gather_result is not None:
                gathers.append(group)

        monkeypatch.setattr(_fsdp_param_group.FSDPParamGroup, "unshard", counted_unshard)
        forward_backward(model, rows, micro_batch_size=4, device=torch.device("cpu"))  # one micro-batch
        one_micro_batch = len(gathers)
        whole = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        gathers.clear()
        forward_backward(model, rows, micro_batch_size=1, device=torch.device("cpu"))  # four
        assert one_micro_batch > 0 and len(gathers) == one_micro_batch
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), whole[n], rtol=1e-4, atol=1e-6, msg=n)
        # The weights are sharded again for the optimizer step.
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
