"""Drain this Ray node when EC2 announces a spot interruption (cluster-launcher workers).

On Kubernetes the pod's preStop hook does this (k8s/raycluster.yaml); a VM started by
`ray up cluster/aws-spot.yaml` has no such hook, so this watcher runs beside the raylet:

1. poll the instance metadata service (IMDSv2) for ``spot/instance-action``, which appears
   about two minutes before EC2 reclaims the instance;
2. on a notice, ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` with the time left
   (minus a margin): Ray Train's preemption watcher sees the drain, ``ray.train.get_preemption_info()``
   turns non-None on every worker, and raycpt saves a checkpoint at its next step boundary.

Standard library only at import time; Ray is imported when a notice arrives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

IMDS_URL = "http://169.254.169.254/latest"
LOCK_PATH = "/tmp/ray/spot_watch.lock"


def seconds_until(notice: dict[str, Any], now: dt.datetime) -> float:
    """Seconds from `now` to the reclaim time of an instance-action notice
    (``{"action": "terminate", "time": "2025-01-01T12:00:00Z"}``)."""
    when = dt.datetime.strptime(notice["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (when - now).total_seconds()


def drain_deadline_s(notice: dict[str, Any], now: dt.datetime, margin_s: int) -> int:
    """Deadline to give Ray: the time left before the reclaim, less a margin for Ray to stop."""
    return max(0, int(seconds_until(notice, now)) - margin_s)


def _imds_token(timeout_s: float) -> str:
    req = urllib.request.Request(f"{IMDS_URL}/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.read().decode()


def poll_notice(token: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The pending instance-action notice, or None (IMDS answers 404 until there is one)."""
    req = urllib.request.Request(f"{IMDS_URL}/meta-data/spot/instance-action",
                                 headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def this_node_id() -> str:
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def drain_command(node_id: str, deadline_s: int, message: str) -> list[str]:
    return ["ray", "drain-node", "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", message, "--deadline-remaining-seconds", str(deadline_s)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval-s", type=float, default=5.0, help="seconds between IMDS polls")
    p.add_argument("--margin-s", type=int, default=20,
                   help="seconds kept back from the reclaim time for Ray to stop")
    a = p.parse_args(argv)

    lock = open(LOCK_PATH, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("spot_watch: another watcher runs on this node", flush=True)
        return 0

    token, token_at = "", None  # IMDSv2 session token, renewed hourly (it lives 6 h)
    while True:
        try:
            if token_at is None or time.monotonic() - token_at > 3600:
                token, token_at = _imds_token(timeout_s=2.0), time.monotonic()
            notice = poll_notice(token)
        except (OSError, ValueError) as e:  # IMDS hiccup (HTTPError is an OSError): keep watching
            print(f"spot_watch: metadata poll failed: {e}", flush=True)
            token_at = None
            notice = None
        if notice is not None:
            break
        time.sleep(a.interval_s)

    deadline = drain_deadline_s(notice, dt.datetime.now(dt.timezone.utc), a.margin_s)
    print(f"spot_watch: interruption notice {notice}; draining with a {deadline} s deadline", flush=True)
    cmd = drain_command(this_node_id(), deadline, f"EC2 spot interruption at {notice.get('time')}")
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
