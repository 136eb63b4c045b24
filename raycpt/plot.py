"""`raycpt plot RUN`: one PNG with the run's loss per domain and its LR over steps.

Reads only the run's storage: <run>/metrics/train.jsonl (training loss and LR per report) and
<run>/metrics/eval.json (held-out loss per domain at step 0 and every eval interval).
"""

from __future__ import annotations

import io
from typing import Any

from raycpt import storage
from raycpt.checkpoint.layout import latest_committed
from raycpt.checkpoint.state import read_train_state
from raycpt.errors import RaycptError
from raycpt.train.logbook import metrics_uri, read_train_log


class PlotError(RaycptError, RuntimeError):
    pass


def _roles(run_uri: str) -> dict[str, str]:
    entry = latest_committed(run_uri)
    if entry is None:
        return {}
    config = read_train_state(entry.uri).config
    return {s["name"]: s["role"] for s in config["data"]["sources"]}


def read_eval_history(run_uri: str) -> list[dict[str, Any]]:
    uri = metrics_uri(run_uri, "eval.json")
    return storage.read_json(uri) if storage.exists(uri) else []


def plot_run(run_uri: str, output: str) -> str:
    """Write the PNG to `output` (a local path or storage URI); returns it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a cluster node or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("raycpt plot needs matplotlib: pip install 'raycpt[plot]'") from None
    train, evals = read_train_log(run_uri), read_eval_history(run_uri)
    if not train and not evals:
        raise PlotError(f"{run_uri}: no metrics yet (metrics/train.jsonl, metrics/eval.json); "
                        "is this a run folder that has trained?")
    roles = _roles(run_uri)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(9, 6.5), gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.6", lw=1,
                     label="train (blend)")
    names = list(evals[-1]["loss"]) if evals else []
    for name in names:
        pts = [(e["step"], e["loss"][name]) for e in evals if name in e["loss"]]
        role = roles.get(name)
        ax_loss.plot([s for s, _ in pts], [v for _, v in pts], marker="o", lw=2,
                     ls="--" if role == "replay" else "-",
                     label=f"eval {name}"
                     + (f" ({'old domain' if role == 'replay' else 'new domain'})" if role else ""))
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(f"{run_uri.rstrip('/').rsplit('/', 1)[-1]}: loss per domain")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="best", fontsize=8)
    if train:
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(output if "://" in output else _abs(output), buf.getvalue())
    return output


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)
