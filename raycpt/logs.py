"""What reaches the driver's terminal: raycpt's lines, warnings that need the user, and errors.

Ray forwards every line its worker processes write (`ray.init(log_to_driver=True)`) to the
driver's terminal. raycpt's own lines are among them (rank 0 prints progress, eval and the
start decision to its stdout), but so is Ray's internal logging, which goes to the workers'
stderr: Ray Train's `Reporting training result ... TrainingReport(...)` per report (the root
logger of every train worker, ray/train/v2/_internal/execution/context.py), the
PlacementGroupCleaner's `Failed to query Ray Train Controller actor state` warnings
(ray.train.v2...placement_group_cleaner), `core_worker.cc` lines, Ray Data's progress bars and
operator logs of the streams running inside the workers.

The quiet default (this module) keeps all of those, and writes them to the run's log file
instead: <run>/logs/driver.log for a run in a local folder, else
<Ray session>/logs/raycpt-driver.log (e.g. /tmp/ray/session_latest/logs/ on the driver's node).
On the terminal stay:
  - every worker stdout line (raycpt's `[raycpt]` lines, the user's own prints);
  - worker stderr lines that are raycpt's own (`raycpt:` warnings) or Python ERROR records (not
    the traceback lines after them, which go to the file);
  - on the driver itself, Ray's loggers at WARNING and above (INFO goes to the file), less the
    "Unhandled error" of each trial a sweep stopped (a Ray Train traceback that says nothing new).
`raycpt --verbose ...` (or RAYCPT_VERBOSE=1, inherited by subprocesses) keeps Ray's default:
everything on the terminal, as before.

Ray has no public hook to filter forwarded lines, so the filter wraps the handler that
`ray.init` registers on the driver's stdstream dispatcher (ray/_private/worker.py,
`print_to_stdstream`, registered as "ray_print_logs"); raycpt pins Ray to 2.60.x.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Callable

VERBOSE_ENV = "RAYCPT_VERBOSE"
LOG_NAME = "driver.log"
_HANDLER_NAME = "raycpt_route_logs"
_RAY_HANDLER_NAME = "ray_print_logs"
# Driver-side Ray loggers that carry their own console handler (propagate=False).
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
# A Python logging record of level ERROR/CRITICAL as Ray formats it ("... ERROR file.py:12 -- msg").
_PY_ERROR = re.compile(r"^\S*\s*(\d{4}-\d\d-\d\d [\d:,]+\s+)?(ERROR|CRITICAL)\b")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def set_verbose(on: bool) -> None:
    """The CLI's --verbose; an environment variable so that subprocesses (ray job submit
    drivers, the demo's runs) inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def shown_on_terminal(line: str, is_err: bool) -> bool:
    """The quiet default's rule for one forwarded worker line. On stderr only raycpt's own
    warnings ("raycpt: ...") and ERROR records: the lines of a worker's traceback (which name
    raycpt's files and errors too) go to the log file, and the driver ends with raycpt's paragraph."""
    if not is_err:
        return True
    return "raycpt:" in line or bool(_PY_ERROR.match(line))


class _Router:
    """Replaces Ray's print handler on the dispatcher: every line to the log file, the shown
    ones on to Ray's own printer (which keeps its prefixes, dedup and tqdm handling)."""

    def __init__(self, ray_print: Callable[[dict[str, Any]], None]):
        self.ray_print = ray_print
        self.lock = threading.Lock()
        self.file = None
        self.path: str | None = None

    def open(self, path: str) -> None:
        with self.lock:
            if self.path == path:
                return
            if self.file is not None:
                self.file.close()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.file = open(path, "a", buffering=1)
            self.path = path

    def __call__(self, data: dict[str, Any]) -> None:
        lines = data.get("lines", [])
        is_err = bool(data.get("is_err"))
        who = data.get("actor_name") or data.get("task_name") or ""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.lock:
            if self.file is not None:
                stream = "err" if is_err else "out"
                self.file.writelines(f"{stamp} ({who} pid={data.get('pid')} {stream}) {line}\n" for line in lines)
        shown = [line for line in lines if shown_on_terminal(line, is_err)]
        if shown:
            self.ray_print({**data, "lines": shown})


_router: _Router | None = None
_file_handler: logging.Handler | None = None


def default_log_path() -> str:
    """<Ray session>/logs/raycpt-driver.log of the connected Ray (where Ray keeps its own logs)."""
    import ray

    node = ray._private.worker._global_node  # the session folder has no public accessor
    base = node.get_logs_dir_path() if node is not None else os.path.join("/tmp", "ray")
    return os.path.join(base, "raycpt-" + LOG_NAME)


def run_log_path(run_uri: str) -> str:
    """<run>/logs/driver.log for a run in a local folder; the Ray session's file otherwise
    (an object store cannot be appended to)."""
    from raycpt import storage

    if storage.is_remote(run_uri):
        return default_log_path()
    return os.path.join(storage.local_path(run_uri), "logs", LOG_NAME)


def route_ray_output(path: str | None = None) -> str | None:
    """Apply the quiet default on this (connected) driver, writing Ray's lines to `path` (default:
    the Ray session's logs folder); returns that path, or None in verbose mode. Call again with
    another path to move on to the next run's file."""
    global _router
    if verbose():
        return None
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    path = path or default_log_path()
    if _router is None:
        ray_print = next((h for name, h in dispatcher.handlers if name == _RAY_HANDLER_NAME), None)
        if ray_print is None:  # log_to_driver=False: nothing is forwarded, nothing to route
            return None
        _router = _Router(ray_print)
        dispatcher.remove_handler(_RAY_HANDLER_NAME)
        dispatcher.add_handler(_HANDLER_NAME, _router)
    _router.open(path)
    _route_driver_loggers(path)
    return path


class _StoppedTrialErrors(logging.Filter):
    """Keeps off the terminal Ray's "Unhandled error" record for a Tune trial's function task
    (`ImplicitFunc.train()`). Tune reads every result and error of a trial it runs; a task error
    nobody read is that of a trial the sweep stopped (its workers were taken down with it), and
    it prints a Ray Train ControllerError traceback per stopped trial. The file keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unhandled error") and "ImplicitFunc.train()" in message)


_STOPPED_TRIAL_ERRORS = _StoppedTrialErrors()


def _route_driver_loggers(path: str) -> None:
    """Ray's loggers in the driver process: INFO to the file, WARNING and up stay on the terminal."""
    global _file_handler
    import ray.data  # noqa: F401 - Ray Data sets up its loggers on import; adjust them after that

    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s (driver) %(levelname)s %(name)s: %(message)s"))
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        if _file_handler is not None:
            logger.removeHandler(_file_handler)
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
                if _STOPPED_TRIAL_ERRORS not in h.filters:
                    h.addFilter(_STOPPED_TRIAL_ERRORS)
        if name == "ray" or not logger.propagate:  # a propagating child reaches "ray"'s file handler
            logger.addHandler(handler)
    if _file_handler is not None:
        _file_handler.close()
    _file_handler = handler


def route_ray_logs_to_run(run_uri: str) -> str | None:
    """Move Ray's lines to this run's log file and say where they go (once per run)."""
    path = route_ray_output(run_log_path(run_uri))
    if path:
        print(f"raycpt: Ray's own log lines go to {path} (`raycpt --verbose ...` shows them here)", flush=True)
    return path
