"""An elastic run (`scaling.num_workers: [1, 2]`) on a multi-node Ray cluster (ray.cluster_utils):
it starts on 2 workers; one node gets a spot preemption notice (a drain with a deadline, as
KubeRay's preStop hook sends), the run checkpoints at the next step and trains on; then the node
is gone, Ray Train carries on with the 1 worker that still fits, resumes from that checkpoint,
and the run ends where an uninterrupted run ends.

The cluster lives in a subprocess: this test session already runs its own local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import sample_log, tiny_job_tree
from raycpt import storage
from raycpt.checkpoint.layout import latest_committed

pytestmark = pytest.mark.slow

CLUSTER_RUN = textwrap.dedent("""
    import json, os, subprocess, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from raycpt import storage
    from raycpt.checkpoint.layout import latest_committed
    from raycpt.config import load_job
    from raycpt.launch import train

    job = load_job(sys.argv[1])
    # Two GPU-node stand-ins with room for exactly one training worker each (2 CPUs), and CPU for
    # the data readers and their step tasks on nodes too small for a training worker.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    doomed = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    def reclaim_a_node():
        # A spot reclaim as KubeRay's preStop hook reports it: a preemption drain with a deadline,
        # then the node is gone.
        while latest_committed(job.run_uri) is None or latest_committed(job.run_uri).step < 2:
            time.sleep(0.2)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        subprocess.run([ray_cli, "drain-node", f"--address={cluster.address}", f"--node-id={doomed.node_id}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                        "--deadline-remaining-seconds=120"], check=True, capture_output=True)
        t0 = time.time()
        while time.time() - t0 < 120:  # until the just-in-time checkpoint of the notice commits
            try:
                state = storage.read_json(storage.join(latest_committed(job.run_uri).uri, "train_state.json"))
            except FileNotFoundError:  # retention removed it between the listing and the read
                continue
            if state.get("reason") == "preemption notice":
                break
            time.sleep(0.2)
        cluster.remove_node(doomed, allow_graceful=False)
        print("removed a node at committed step", latest_committed(job.run_uri).step, flush=True)

    threading.Thread(target=reclaim_a_node, daemon=True).start()
    result = train(job)
    print("RESULT", json.dumps({"error": None if result.error is None else str(result.error)}), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


def test_elastic_run_loses_a_node_and_finishes_on_fewer_workers(straight_run, tmp_path, tiny_model,
                                                                  prepared_sources):
    _, straight_uri = straight_run
    tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, run={"name": "elastic"},
                         train={"max_steps": 8, "log_sample_ids": True},  # the notice is polled every step
                         scaling={"num_workers": [1, 2], "cpus_per_worker": 2}, checkpoint={"max_failures": 3})
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(tree))
    script = tmp_path / "cluster_run.py"
    script.write_text(CLUSTER_RUN)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Until the GCS marks the lost node dead (~30 s by Ray's default health checks: every 3 s, 5
    # misses) Ray Train sees room for the old size and asks for it again, and each such placement
    # group waits out the worker-group start timeout (60 s by default) before the controller looks
    # again. The test is of the resume that follows, not of those timers: shorter ones (node health
    # checked every second, dead after 3 misses; 10 s to start a worker group) reach the same
    # decision, the 1 worker that fits, sooner.
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="10")
    out = subprocess.run([sys.executable, str(script), str(job_yaml)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(__file__))
    log = out.stdout + out.stderr
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert result and json.loads(result[-1][7:])["error"] is None, log[-5000:]
    assert "removed a node" in out.stdout, log[-3000:]

    run_uri = str(tmp_path / "runs" / "elastic")
    folder = storage.join(run_uri, "metrics", "starts")
    starts = [storage.read_json(storage.join(folder, n)) for n in storage.list_dir(folder)]
    assert [s["world_size"] for s in starts][:1] == [2] and starts[-1]["world_size"] == 1, starts
    assert starts[-1]["kind"] == "resume"
    assert starts[-1]["saved_for"] == "preemption notice", starts[-1]
    assert latest_committed(run_uri).step == 8
    straight = {s: ids for s, ids in sample_log(straight_uri).items() if s < 8}
    assert sample_log(run_uri) == straight, "the elastic run trained a different sample sequence"
