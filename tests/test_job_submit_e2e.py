"""End to end: `ray start --head` + a worker node, `ray job submit` of a demo-sized job, `ray job
stop` mid-run, a killed worker node, resubmission; the run resumes from its committed step and
finishes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_job_tree
from raycpt.checkpoint.layout import latest_committed
from raycpt.config import parse_job

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    # Another Ray on this machine (the tests' in-process one) holds the default agent ports.
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]


def _ray(*args: str, timeout: float = 120, check: bool = True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode:
        raise AssertionError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture()
def cluster():
    """Head and worker node as process groups of our own, so teardown never touches other Ray
    instances on the machine (`ray stop` would stop them all)."""
    import shutil
    import tempfile

    port, dash = _free_port(), _free_port()
    tmp = tempfile.mkdtemp(prefix="rcpt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": tmp}
    address = f"127.0.0.1:{port}"
    nodes = [subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                               "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
                               *_agent_ports(),
                               f"--temp-dir={tmp}", "--block"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        t0 = time.time()
        while _ray("job", "list", f"--address=http://127.0.0.1:{dash}", check=False, env=env).returncode != 0:
            assert time.time() - t0 < 90 and nodes[0].poll() is None, "the head node did not start"
            time.sleep(1)
        nodes.append(subprocess.Popen([str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=2", "--block",
                                       *_agent_ports()],
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env, "worker": nodes[1]}
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=5)  # a blocked `ray start` drains slowly; nothing here needs that
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(cluster, job_yaml: Path, job_id: str) -> None:
    t0 = time.time()
    while "No available agent" in (probe := _ray("job", "list", f"--address={cluster['dashboard']}", check=False,
                                                  env=cluster["env"])).stdout + probe.stderr or probe.returncode:
        assert time.time() - t0 < 60, probe.stderr[-2000:]
        time.sleep(1)
    for attempt in range(30):  # the job agent may come up a little after the dashboard
        proc = _ray("job", "submit", f"--address={cluster['dashboard']}", f"--submission-id={job_id}", "--no-wait",
                    "--working-dir", str(REPO), "--", sys.executable, "-m", "raycpt.cli", "train", str(job_yaml),
                    env=cluster["env"], check=False)
        if proc.returncode == 0:
            return
        assert "No available agent" in proc.stderr, proc.stderr[-3000:]
        time.sleep(2)
    raise AssertionError("the job agent never came up")


def _jobs(cluster):
    """The job API over HTTP, for the polls: a `ray job status` process per poll imports Ray
    (seconds of CPU each) on the cores the job trains on. Submit and stop stay the CLI users type."""
    from ray.job_submission import JobSubmissionClient

    if "client" not in cluster:
        cluster["client"] = JobSubmissionClient(cluster["dashboard"])
    return cluster["client"]


def _status(cluster, job_id: str) -> str:
    return _jobs(cluster).get_job_status(job_id).value


def _logs(cluster, job_id: str) -> str:
    return _jobs(cluster).get_job_logs(job_id)


def test_submit_stop_kill_node_resubmit_resumes_and_finishes(cluster, tmp_path, tiny_model, prepared_sources):
    tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, run={"name": "submitted"},
                         train={"max_steps": 10}, checkpoint={"interval_steps": 2, "max_failures": 3})
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(tree))
    run_uri = parse_job(tree).run_uri

    _submit(cluster, job_yaml, "cpt-1")
    t0 = time.time()
    while (latest_committed(run_uri) is None or latest_committed(run_uri).step < 2) and time.time() - t0 < 300:
        assert _status(cluster, "cpt-1") in ("RUNNING", "PENDING"), _logs(cluster, "cpt-1")[-3000:]
        time.sleep(1)
    stopped_at = latest_committed(run_uri).step
    _ray("job", "stop", f"--address={cluster['dashboard']}", "cpt-1", env=cluster["env"])
    assert stopped_at < 10

    # The worker node goes away too (a reclaimed spot node).
    os.killpg(cluster["worker"].pid, signal.SIGKILL)
    cluster["worker"].wait()

    _submit(cluster, job_yaml, "cpt-2")
    t0 = time.time()
    while _status(cluster, "cpt-2") in ("RUNNING", "PENDING") and time.time() - t0 < 400:
        time.sleep(2)
    logs = _logs(cluster, "cpt-2")
    assert _status(cluster, "cpt-2") == "SUCCEEDED", logs[-4000:]
    committed_before = stopped_at
    assert "resuming step" in logs
    resumed_from = int(logs.split("resuming step ", 1)[1].split()[0])
    assert resumed_from >= committed_before
    assert latest_committed(run_uri).step == 10
    st = json.loads(subprocess.run([sys.executable, "-m", "raycpt.cli", "status", run_uri, "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert st["latest_step"] == 10 and sum(st["tokens_per_source"].values()) == 10 * 8 * 64
