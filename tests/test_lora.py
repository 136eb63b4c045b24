"""Partial training for real: LoRA (peft) with embed_tokens/lm_head trained in full, and frozen
lower blocks, on 2 gloo workers under FSDP2 with DCP checkpoints; resume, merged export, a PEFT
adapter folder and continuing from it (`model.init.source: adapter`).
"""

from __future__ import annotations

import pytest
import torch

from conftest import one_rank_group, tiny_job_tree
from raycpt import storage
from raycpt.checkpoint.layout import latest_committed
from raycpt.config import parse_job
from raycpt.launch import train

pytestmark = pytest.mark.slow

LORA = {"rank": 4, "alpha": 8.0, "train_embeddings": True}


def lora_tree(store: str, base: str, sources: dict[str, str], name: str, max_steps: int,
              model: dict | None = None, train: dict | None = None, **sections) -> dict:
    return tiny_job_tree(store, base, sources, run={"name": name}, model={"base": base, "lora": LORA, **(model or {})},
                         train={"max_steps": max_steps, **(train or {})},
                         optim={"peak_lr": 1e-2, "warmup_steps": 1, "embedding_lr_ratio": 0.25}, **sections)


def fit(tree: dict) -> None:
    result = train(parse_job(tree))
    assert result.error is None, result.error


def checkpoint_state(run_uri: str, base: str, lora: dict | None) -> dict[str, torch.Tensor]:
    """The newest checkpoint's full model state, read in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    from raycpt.checkpoint.dcp import storage_reader
    from raycpt.config import LoraConfig
    from raycpt.model.lora import add_adapters

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.float32)
    if lora:
        add_adapters(model, LoraConfig(**lora))
    sd = model.state_dict()
    dcp.load({"model": sd}, storage_reader=storage_reader(latest_committed(run_uri).uri))
    return sd


def base_state(base: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f"{base}/model.safetensors")


def run_in_process(tree: dict, tmp_path) -> None:
    """The worker loop on one rank in this process (gloo, FSDP2 on a 1-rank mesh, no Ray): the
    cheap way to drive short runs; the 2-worker runs go through Ray Train."""
    from raycpt.train.loop import run_worker

    with one_rank_group(str(tmp_path / f"store-{tree['run']['name']}")):
        run_worker({"job": parse_job(tree).model_dump(mode="json"), "local_stream": True})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, prepared_sources, ray_local) -> str:
    """LoRA + embeddings, 4 steps on 2 Ray Train workers, checkpoints at steps 2 and 4."""
    store = str(tmp_path_factory.mktemp("lora-runs"))
    tree = lora_tree(store, tiny_model, prepared_sources, "lora", 4, eval={"interval_steps": 2})
    fit(tree)
    return parse_job(tree).run_uri


def test_lora_trains_adapters_and_embeddings_only(lora_run, tiny_model):
    after, before = checkpoint_state(lora_run, tiny_model, LORA), base_state(tiny_model)
    frozen = [k for k in after if ".base_layer." in k or "norm" in k]
    assert frozen, "no frozen base weights found"
    for k in frozen:
        assert torch.equal(after[k], before[k.replace(".base_layer.", ".")]), f"frozen {k} changed"
    lora_b = [k for k in after if ".lora_B." in k]
    assert len(lora_b) == 2 * 7  # 2 blocks x 7 target Linear layers
    assert all(after[k].abs().max() > 0 for k in lora_b), "an adapter did not train (lora_B still zero)"
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_lora_resume_after_a_checkpoint_continues_the_run(lora_run, tiny_model, tmp_path):
    """Stopped right after its step-2 checkpoint (all later state lost), then resumed on 1 worker
    (DCP reshards 2 -> 1): steps 3-4 give the uninterrupted run's adapters, embeddings, evals."""
    import shutil

    from raycpt.checkpoint.layout import step_uri

    tree = storage.read_json(storage.join(step_uri(lora_run, 4), "train_state.json"))["config"]
    stopped = str(tmp_path / "stopped")
    shutil.copytree(storage.local_path(step_uri(lora_run, 2)),
                    storage.local_path(step_uri(f"{stopped}/lora", 2)))
    run_in_process({**tree, "run": {**tree["run"], "storage": stopped}, "scaling": {"num_workers": 1}}, tmp_path)
    a, b = checkpoint_state(lora_run, tiny_model, LORA), checkpoint_state(f"{stopped}/lora", tiny_model, LORA)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), f"{k} differs after resume: {(a[k] - b[k]).abs().max()}"
    ha = storage.read_json(storage.join(lora_run, "metrics", "eval.json"))
    hb = storage.read_json(storage.join(stopped, "lora", "metrics", "eval.json"))
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [0, 2, 4]
    for x, y in zip(ha, hb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)


def test_lora_export_merged_matches_training_eval_and_adapter_folder(lora_run, tiny_model, prepared_sources, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from raycpt.cli import main
    from raycpt.data.manifest import read_manifest
    from raycpt.data.stream import read_eval_rows
    from raycpt.train.evaluate import eval_losses

    straight_uri = lora_run
    out, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert main(["export", straight_uri, "--output", str(out), "--adapter", str(adapter)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in k for k in merged.state_dict())

    # The exported folder scores the held-out rows exactly as the FSDP workers did at the last step.
    last = storage.read_json(storage.join(straight_uri, "metrics", "eval.json"))[-1]
    rows = {n: read_eval_rows(read_manifest(p), 4) for n, p in prepared_sources.items()}
    losses = eval_losses(merged, rows, 0, 1, 2, torch.device("cpu"))
    assert losses == pytest.approx(last["loss"], abs=1e-4)

    # The PEFT adapter folder on the base model gives the merged model's logits.
    x = torch.as_tensor(rows["code"][:2], dtype=torch.long)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-4)


def test_init_from_adapter_starts_where_the_adapter_left_off(lora_run, tiny_model, prepared_sources, tmp_path):
    from raycpt.checkpoint.export import export_hf

    adapter = str(tmp_path / "adapter")
    export_hf(lora_run, str(tmp_path / "merged"), adapter_dir=adapter)
    tree = lora_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, "from-adapter", 1,
                     model={"init": {"source": "adapter", "adapter": adapter}}, scaling={"num_workers": 1})
    run_in_process(tree, tmp_path)
    first = storage.read_json(storage.join(parse_job(tree).run_uri, "metrics", "eval.json"))[0]
    last = storage.read_json(storage.join(lora_run, "metrics", "eval.json"))[-1]
    assert first["step"] == 0 and first["loss"] == pytest.approx(last["loss"], abs=1e-4)


def test_freeze_layers_keeps_lower_blocks_and_embeddings(tmp_path, tiny_model, prepared_sources):
    tree = tiny_job_tree(str(tmp_path), tiny_model, prepared_sources, run={"name": "frozen"},
                         model={"freeze_layers": 1, "freeze_embeddings": True}, train={"max_steps": 2},
                         optim={"peak_lr": 1e-2, "warmup_steps": 1}, scaling={"num_workers": 1})
    run_in_process(tree, tmp_path)
    after, before = checkpoint_state(parse_job(tree).run_uri, tiny_model, None), base_state(tiny_model)
    for k, v in after.items():
        lower = k.startswith("model.layers.0.") or "embed_tokens" in k or k == "lm_head.weight"
        changed = not torch.equal(v, before.get(k, before["model.embed_tokens.weight"]))
        if lower:
            assert not changed, f"frozen {k} changed"
        elif k.endswith("proj.weight"):
            assert changed, f"trainable {k} did not change"


def test_adapter_init_with_a_different_rank_is_refused(lora_run, tmp_path):
    from raycpt.checkpoint.export import export_hf
    from raycpt.config import LoraConfig
    from raycpt.model.hf import ModelError
    from raycpt.model.lora import check_adapter_config

    adapter = str(tmp_path / "adapter")
    export_hf(lora_run, str(tmp_path / "merged"), adapter_dir=adapter)
    with pytest.raises(ModelError, match=r"model.lora.rank: 8, the adapter has r=4"):
        check_adapter_config(adapter, LoraConfig(**{**LORA, "rank": 8}))


def read_tb_scalars(folder: str) -> dict[str, dict[int, float]]:
    """tag -> step -> value from the TensorBoard event files in a folder (TFRecord framing)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(f"{folder}/events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_metrics_log_tensorboard_and_plot(lora_run, tmp_path):
    from raycpt.cli import main
    from raycpt.train.logbook import read_train_log
    from raycpt.train.metrics import progress_line

    records = read_train_log(lora_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "data_wait_share", "checkpoint_stall_s", "eta_s",
                "tokens/code", "tokens/english"} <= set(r)
        assert "step 4/4" in progress_line({"mfu": None, **records[-1]}) if r["step"] == 4 else True
    assert records[-1]["tokens/english"] == 4 * 2 * 64  # a quarter of 4 batches of 8 x 64 tokens

    tb = read_tb_scalars(storage.local_path(storage.join(lora_run, "metrics", "tb")))
    assert sorted(tb["train/loss"]) == [1, 2, 3, 4]
    assert tb["train/lr"][1] == pytest.approx(records[0]["lr"])
    for tag in ("train/grad_norm", "train/tokens_per_s", "tokens/code", "eval/code/loss", "eval/code/perplexity",
                "eval/english/loss", "eval/english/forgetting"):
        assert tag in tb, f"{tag} missing from TensorBoard"
    assert sorted(tb["eval/code/loss"]) == [0, 2, 4]
    assert tb["eval/english/forgetting"][0] == 0.0

    png = tmp_path / "curves.png"
    assert main(["plot", lora_run, "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_partial_training_config_errors_name_the_keys(tmp_path):
    from raycpt.config import ConfigError

    sources = {"code": str(tmp_path / "c"), "english": str(tmp_path / "e")}
    tree = tiny_job_tree(str(tmp_path), str(tmp_path), sources, model={"init": {"source": "adapter"}})
    with pytest.raises(ConfigError) as e:
        parse_job(tree)
    assert "model.init.adapter: required" in str(e.value) and "model.lora: required" in str(e.value)
    tree = tiny_job_tree(str(tmp_path), str(tmp_path), sources, model={"lora": LORA, "freeze_embeddings": True})
    with pytest.raises(ConfigError, match="model.freeze_embeddings: contradicts model.lora.train_embeddings"):
        parse_job(tree)
