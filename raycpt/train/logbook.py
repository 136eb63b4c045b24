"""What a run leaves for people and plots to read, written by rank 0 into the run's storage:

    <run>/metrics/train.jsonl   one JSON object per report interval (the progress-line fields)
    <run>/metrics/eval.json     per-domain eval history (written by the loop)
    <run>/metrics/tb/           TensorBoard event files (tensorboardX)
    MLflow                      when `metrics.mlflow_tracking_uri` is set and mlflow is installed
    Weights & Biases            when `metrics.wandb_project` is set (wandb installed); its local
                                files (offline runs included) under <run>/metrics/wandb/

Files are written in a local folder and copied to storage at each `flush` (checkpoint, eval, end)
when the run lives on s3://, because object stores cannot append; a local run writes in place.
A resumed run first drops the records after its checkpoint's step (they are trained again), and
its TensorBoard writer purges them too (`purge_step`), so every curve shows each step once.
MLflow and W&B runs are continued by id (kept in <run>/metrics/); W&B ignores a step lower than
one it already holds, so there the records of the re-trained steps are the dead attempt's. Each
attempt is its own worker process (a second wandb.init of one id in one process was seen to drop
the resumed attempt's rows in offline mode, wandb 0.31).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from raycpt import storage

TRAIN_LOG = "train.jsonl"
TB_DIR = "tb"
WANDB_DIR = "wandb"
# Progress fields charted in TensorBoard under train/ (tokens/<source> go under tokens/).
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_share", "checkpoint_stall_s")


def metrics_uri(run_uri: str, *parts: str) -> str:
    return storage.join(run_uri, "metrics", *parts)


def read_train_log(run_uri: str) -> list[dict[str, Any]]:
    """The run's report records, one per step (a step trained twice keeps its last record)."""
    uri = metrics_uri(run_uri, TRAIN_LOG)
    if not storage.exists(uri):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in storage.read_bytes(uri).decode().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


class MetricsLog:
    """Rank 0 writes; on other ranks every method does nothing."""

    def __init__(self, run_uri: str, run_name: str, start_step: int, rank: int, tensorboard: bool = True,
                 mlflow_tracking_uri: str | None = None, mlflow_experiment: str | None = None,
                 params: dict[str, Any] | None = None, wandb: dict[str, str | None] | None = None):
        """`wandb`: {project, entity, mode} (MetricsConfig.wandb_init()), or None for no W&B."""
        self.active = rank == 0
        if not self.active:
            return
        self.run_uri = run_uri
        self.remote = storage.is_remote(run_uri)
        self.folder = tempfile.mkdtemp(prefix="raycpt-metrics-") if self.remote else storage.local_path(
            metrics_uri(run_uri))
        os.makedirs(self.folder, exist_ok=True)
        # Keep the records up to the step this attempt starts from; later ones are trained again.
        kept = [r for r in read_train_log(run_uri) if r["step"] <= start_step]
        with open(os.path.join(self.folder, TRAIN_LOG), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.log_file = open(os.path.join(self.folder, TRAIN_LOG), "a", buffering=1)
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            # Steps after the checkpoint were trained by an attempt that died: TensorBoard drops them.
            self.tb = SummaryWriter(logdir=os.path.join(self.folder, TB_DIR), purge_step=start_step + 1 if start_step
                                    else None, flush_secs=30,
                                    # one file per attempt even within a second (names carry time and host)
                                    filename_suffix=f".{os.getpid()}.from-step-{start_step}")
        self.mlflow = _start_mlflow(run_uri, run_name, mlflow_tracking_uri, mlflow_experiment, params) \
            if mlflow_tracking_uri else None
        self.wandb = _start_wandb(run_uri, run_name, self.folder, start_step, wandb, params) if wandb else None

    def train(self, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        step = int(metrics["step"])
        self.log_file.write(json.dumps({k: v for k, v in metrics.items() if v is not None}) + "\n")
        scalars = {f"train/{k}": metrics[k] for k in TRAIN_SCALARS if metrics.get(k) is not None}
        scalars.update({k: v for k, v in metrics.items() if k.startswith("tokens/")})
        self._scalars(scalars, step)

    def eval(self, record: dict[str, Any]) -> None:
        """One eval record (raycpt/train/evaluate.py): per source and probe eval/<name>/loss,
        perplexity, forgetting and relative_forgetting; per task task/<name>/acc and acc_norm."""
        if not self.active:
            return
        scalars: dict[str, float] = {}
        for name, loss in {**record["loss"], **record.get("probe_loss", {})}.items():
            scalars[f"eval/{name}/loss"] = loss
            scalars[f"eval/{name}/perplexity"] = math.exp(min(loss, 50.0))
        for name, delta in {**record.get("forgetting", {}), **record.get("probe_forgetting", {})}.items():
            scalars[f"eval/{name}/forgetting"] = delta
        for name, share in record.get("relative_forgetting", {}).items():
            scalars[f"eval/{name}/relative_forgetting"] = share
        for name, t in record.get("tasks", {}).items():
            scalars[f"task/{name}/acc"] = t["acc"]
            scalars[f"task/{name}/acc_norm"] = t["acc_norm"]
        self._scalars(scalars, int(record["step"]))
        self.flush()

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, float(value), step)
        if self.mlflow is not None:
            # MLflow metric names may not hold '/' on every backend's UI path; keep them flat.
            self.mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in scalars.items()}, step=step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in scalars.items()}, step=step)

    def flush(self) -> None:
        """Make everything written so far durable in the run's storage."""
        if not self.active:
            return
        self.log_file.flush()
        if self.tb is not None:
            self.tb.flush()
        if self.remote:
            for root, _, files in os.walk(self.folder):
                for name in files:
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, self.folder).replace(os.sep, "/")
                    with open(path, "rb") as f:
                        storage.write_bytes(metrics_uri(self.run_uri, *rel.split("/")), f.read())

    def close(self) -> None:
        if not self.active:
            return
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()  # before the last flush: its finished files go to s3:// too
            self.wandb = None
        self.flush()
        self.log_file.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _start_mlflow(run_uri: str, run_name: str, tracking_uri: str, experiment: str | None,
                  params: dict[str, Any] | None):
    """Log to MLflow; a resumed raycpt run continues the same MLflow run (its id is kept in storage)."""
    try:
        import mlflow
    except ImportError:
        raise RuntimeError("metrics.mlflow_tracking_uri: set, but mlflow is not installed on the workers; "
                           "pip install mlflow, or unset the key") from None
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment or run_name)
    id_uri = metrics_uri(run_uri, "mlflow.json")
    run_id = storage.read_json(id_uri)["run_id"] if storage.exists(id_uri) else None
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    if run_id is None:
        storage.write_json(id_uri, {"run_id": active.info.run_id, "tracking_uri": tracking_uri})
        if params:
            mlflow.log_params(params)
    return mlflow


def _start_wandb(run_uri: str, run_name: str, folder: str, start_step: int, target: dict[str, str | None],
                 params: dict[str, Any] | None):
    """A W&B run for this raycpt run; a resumed raycpt run continues the same W&B run (its id is
    kept in storage). Its files go under the metrics folder, so an offline run is kept with the
    raycpt run (and uploaded later with `wandb sync <run>/metrics/wandb/wandb/offline-run-*`)."""
    try:
        import wandb
    except ImportError:
        from raycpt.config import ConfigError

        raise ConfigError("metrics.wandb_project: set, but wandb is not installed on the workers; "
                          "pip install 'raycpt[wandb]' (or pip install wandb), or unset the key") from None
    id_uri = metrics_uri(run_uri, "wandb.json")
    run_id = storage.read_json(id_uri)["run_id"] if storage.exists(id_uri) else None
    wandb_dir = os.path.join(folder, WANDB_DIR)
    os.makedirs(wandb_dir, exist_ok=True)
    run = wandb.init(project=target["project"], entity=target.get("entity"), mode=target.get("mode"),
                     dir=wandb_dir, name=run_name, id=run_id, resume="allow",
                     config=params or {}, settings=wandb.Settings(console="off", silent=True))
    if run_id is None:
        storage.write_json(id_uri, {"run_id": run.id, "project": target["project"], "start_step": start_step})
    return run
