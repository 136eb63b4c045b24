"""The run's metrics record: a resumed run drops the steps after its checkpoint, once."""

from __future__ import annotations

import json

import pytest

from raycpt.train.logbook import MetricsLog, read_train_log


def report(step: int, loss: float) -> dict:
    return {"step": step, "max_steps": 6, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 10.0,
            "mfu": None, "data_wait_share": 0.0, "checkpoint_stall_s": 0.0, "eta_s": 1.0, "tokens/new": 64 * step}


def test_resume_drops_records_after_the_checkpoint_and_rank_1_writes_nothing(tmp_path):
    run = str(tmp_path / "run")
    first = MetricsLog(run, "run", 0, rank=0)
    for step in (1, 2, 3, 4):
        first.train(report(step, 10.0 - step))
    first.eval({"step": 4, "loss": {"new": 2.0, "old": 3.0}, "forgetting": {"old": 0.1}})
    first.close()  # died after step 4; its last checkpoint was step 2
    MetricsLog(run, "run", 2, rank=1).train(report(3, 0.0))  # other ranks: no-ops
    second = MetricsLog(run, "run", 2, rank=0)
    assert [r["step"] for r in read_train_log(run)] == [1, 2]
    second.train(report(3, 5.5))
    second.close()
    records = read_train_log(run)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 5.5
    assert "mfu" not in records[-1]  # None fields are left out
    assert len(list((tmp_path / "run" / "metrics" / "tb").glob("events.out.tfevents.*"))) == 2


def _wandb_records(path) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version), then LevelDB's log
    format (32 KiB blocks; records of crc32c(4) length(2) type(1) + payload, split FIRST/MIDDLE/LAST
    across blocks). wandb 0.31 reads these files in Go only, so the test reads them itself."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending += payload
        if kind in (1, 4):  # FULL or LAST
            records.append(pending)
            pending = b""
    return records


def _wandb_history(run_folder) -> list[dict]:
    """The metrics rows of an offline W&B run, parsed with wandb's own protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    rows = []
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


_ATTEMPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_logbook import report
from raycpt.train.logbook import MetricsLog
run, start, steps = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
log = MetricsLog(run, "wb", start, rank=0, tensorboard=False, params={"peak_lr": 1e-4},
                 wandb={"project": "raycpt-test", "entity": None, "mode": "offline"})
for step in steps:
    log.train(report(step, 10.0 - step))
if start == 0:
    log.eval({"step": 2, "loss": {"new": 2.0, "old": 3.0}, "forgetting": {"old": 0.1}})
log.close()
"""


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb")
    import os
    import subprocess
    import sys

    # Each attempt in its own process, as each Ray Train attempt's rank 0 is.
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = str(tmp_path / "run")
    for start, steps in ((0, [1, 2]), (2, [3])):
        subprocess.run([sys.executable, "-c", _ATTEMPT, os.path.dirname(__file__), run, str(start), json.dumps(steps)],
                       env=env, check=True, timeout=120)
    run_id = json.loads((tmp_path / "run" / "metrics" / "wandb.json").read_text())["run_id"]
    # One offline folder per attempt, both of the same W&B run; together every step once (wandb
    # merges what is logged at one step, train and eval, into one row).
    folders = sorted((tmp_path / "run" / "metrics" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(list(f.glob(f"run-{run_id}.wandb")) for f in folders), folders
    first, second = sorted((_wandb_history(f) for f in folders), key=lambda rows: rows[0]["_step"] if rows else -1)
    assert [r["_step"] for r in first] == [1, 2] and [r["_step"] for r in second] == [3]
    assert first[0]["train/loss"] == 9.0 and first[1]["train/lr"] == 1e-4 and first[1]["tokens/new"] == 128
    assert first[1]["eval/old/forgetting"] == 0.1 and first[1]["eval/new/loss"] == 2.0
    assert second[0]["train/loss"] == 7.0


def test_wandb_project_without_wandb_installed_names_the_key_and_the_pip_command(tmp_path, monkeypatch):
    import sys

    from conftest import tiny_job_tree
    from raycpt.config import ConfigError, parse_job

    tree = tiny_job_tree("/tmp/runs", "/m", {"code": "/a", "english": "/b"}, metrics={"wandb_project": "p"})
    if "wandb" in sys.modules or __import__("importlib").util.find_spec("wandb"):
        assert parse_job(tree).metrics.wandb_init() == {"project": "p", "entity": None, "mode": None}
    # None in sys.modules is how Python marks a module as not importable (import raises, find_spec is None).
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"metrics.wandb_project: .*pip install 'raycpt\[wandb\]'"):
        parse_job(tree)
    with pytest.raises(ConfigError, match=r"metrics.wandb_project: .*not installed on the workers"):
        MetricsLog(str(tmp_path / "run"), "x", 0, rank=0, tensorboard=False, wandb={"project": "p"})
