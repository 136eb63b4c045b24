"""LoRA + embeddings under FSDP2 mixed precision on a GPU (bf16 compute, fp32 master weights):
one process, a 1-rank NCCL mesh. Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_under_fsdp2_bf16_trains_adapters_and_embeddings_only(tmp_path):
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh

    from raycpt.config import ModelConfig, OptimConfig
    from raycpt.model.fsdp import build_sharded_model
    from raycpt.model.hf import load_config
    from raycpt.model.lora import count_params, init_adapters, partial_training
    from raycpt.model.shapes import write_random_model
    from raycpt.train.optim import build_optimizer

    base = write_random_model("tiny", str(tmp_path / "tiny"))
    cfg = ModelConfig(base=base, lora={"rank": 8, "alpha": 16.0, "train_embeddings": True}, freeze_layers=1)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        model = build_sharded_model(load_config(base), init_device_mesh("cuda", (1,)), device,
                                    param_dtype=torch.bfloat16, attn_implementation="sdpa",
                                    activation_checkpointing=True, compile_blocks=False, weights_from=base,
                                    prepare=partial_training(cfg), single_worker="fsdp2")
        init_adapters(model, seed=0)
        total, trainable = count_params(model)
        assert 0 < trainable < total
        optimizer = build_optimizer(model, OptimConfig(peak_lr=1e-2, embedding_lr_ratio=0.2), device)
        assert {g["name"] for g in optimizer.param_groups} == {"decay", "embeddings"}  # norms are frozen
        x = torch.randint(0, 1000, (2, 64), device=device)
        losses = []
        for _ in range(3):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        after = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float().cpu()
                 for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    before = load_file(f"{base}/model.safetensors")
    for k, v in after.items():
        if ".base_layer." in k or "norm" in k:
            assert torch.equal(v, before[k.replace(".base_layer.", ".")]), f"frozen {k} changed"
        if k.startswith("model.layers.0.") and ".lora_B." in k:
            assert not v.any(), f"{k}: block 0 is frozen, its adapters must stay zero"
        if k.startswith("model.layers.1.") and ".lora_B." in k:
            assert v.abs().max() > 0, f"{k}: adapter did not train"
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
