"""The quiet default: `raycpt train`'s terminal holds raycpt's lines; Ray's per-report and internal
lines go to <run>/logs/driver.log (and `--verbose` keeps Ray's default of showing them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_job_tree
from raycpt.config import parse_job
from raycpt.logs import VERBOSE_ENV, route_ray_output, shown_on_terminal


def test_the_terminal_rule_keeps_raycpt_lines_and_errors_only():
    assert shown_on_terminal("[raycpt] step 2/2 loss 9.1", is_err=False)
    assert shown_on_terminal("anything a user prints", is_err=False)
    assert shown_on_terminal("[2026-12-01 10:00:00,000] WARNING placement.py:67 -- raycpt: could not remove", True)
    assert shown_on_terminal("2026-12-01 10:00:00,000\tERROR worker_group.py:90 -- Worker group failed", True)
    for noise in ("Reporting training result 1: TrainingReport(checkpoint=None, metrics={}) from rank 0",
                  "[2026-12-01 10:00:00,000 W 123 456] core_worker.cc:2431: Actor restarted",
                  "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.",
                  "Running Dataset: dataset_3_0. Active & requested resources: 1/4 CPU",
                  '  File "/work/raycpt/data/stream.py", line 145, in load',  # a worker's traceback
                  "raycpt.data.manifest.DataError: /data/train/part-00001.parquet: row group 0 unreadable"):
        assert not shown_on_terminal(noise, is_err=True), noise


def test_verbose_leaves_rays_output_alone(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert route_ray_output("/nonexistent/driver.log") is None


def test_a_stopped_trials_unhandled_error_goes_to_the_file_only(tmp_path, ray_local, monkeypatch):
    import logging

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    path = route_ray_output(str(tmp_path / "driver.log"))
    stopped = ("Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::ImplicitFunc.train() "
               "(pid=15140, ip=127.0.0.1, repr=run_trial)\nray.train.ControllerError: Training failed")
    other = "Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::read_shard() failed"

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray._private.worker", logging.ERROR, __file__, 1, message, None, None)

    terminals = [h for h in logging.getLogger("ray").handlers
                 if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert terminals
    for h in terminals:
        assert not h.filter(record(stopped))
        assert h.filter(record(other))  # any other task's error stays in sight
    logging.getLogger("ray._private.worker").error(stopped)
    assert "ImplicitFunc.train()" in open(path).read()


@pytest.mark.slow
def test_train_terminal_is_quiet_and_rays_lines_are_in_the_run_log(tmp_path, tiny_model, prepared_sources, ray_local):
    tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, run={"name": "quiet"},
                         train={"max_steps": 2}, checkpoint={"interval_steps": 2}, scaling={"num_workers": 1})
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop(VERBOSE_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "raycpt.cli", "train", str(job_yaml)], env=env,
                          capture_output=True, text=True, timeout=300)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-4000:]
    print(terminal)  # shown by pytest on failure, and with -s
    assert "step 2/2 | loss" in terminal, terminal[-4000:]
    assert "TrainingReport(" not in terminal, terminal[-4000:]
    log = os.path.join(parse_job(tree).run_uri, "logs", "driver.log")
    assert f"Ray's own log lines go to {log}" in terminal
    assert "TrainingReport(" in open(log).read()
