"""The local Ray instance `raycpt` starts on a laptop: reachable from this machine only.

`ray.init(address="local")` with its defaults advertises the machine's network address on Linux:
the GCS, raylet and worker gRPC servers listen on every interface, the dashboard agent and the
runtime-env agent on the network address, and the Prometheus metrics exporter on 0.0.0.0
(unauthenticated). Ray keeps a single-machine mode that advertises 127.0.0.1 instead (its default
on macOS and Windows), chosen by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment of the
process that imports Ray (read once, at import) and inherited by every Ray process it starts.
raycpt sets it for a Ray it starts itself, never when it joins a cluster (RAY_ADDRESS/--address).
Ray's token file (~/.ray/auth_token) is made readable by its owner only.
"""

from __future__ import annotations

import os
import stat
from typing import Any

LOOPBACK = "127.0.0.1"


# Read by ray._private.ray_constants at import: False makes every Ray process of this machine
# advertise and bind the loopback address.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def prefer_loopback() -> None:
    """Call before Ray is imported, when this process will start a local Ray (not join one)."""
    for k, v in SINGLE_MACHINE_ENV.items():
        os.environ.setdefault(k, v)


def local_ray_options() -> dict[str, Any]:
    """ray.init keywords for a Ray that this machine alone can reach."""
    return {"dashboard_host": LOOPBACK}


def token_path() -> str:
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def restrict_token_file() -> bool:
    """Make Ray's token file mode 0600 when it exists with wider permissions; True if it changed.
    (The token lets whoever reads it act on the cluster: submit jobs, run code.)"""
    path = token_path()
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    if mode & 0o077 == 0:
        return False
    os.chmod(path, 0o600)
    return True
