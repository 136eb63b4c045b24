"""`raycpt plot RUN`: one PNG with the run's loss per domain and its LR over steps;
`raycpt plot RUN1 RUN2 ...`: the runs overlaid, one panel per series (plot_runs).

Reads only the run's storage: <run>/metrics/train.jsonl (training loss and LR per report) and
<run>/metrics/eval.json (held-out loss per domain, probe losses and task accuracy at step 0 and
every eval interval).
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


# ---------------------------------------------------------------------------------------------
# `raycpt plot RUN1 RUN2 ...`: several runs overlaid, one panel per series


def eval_series(record: dict[str, Any]) -> dict[str, float]:
    """Every number of one eval record by its path, e.g. loss/code, forgetting/english,
    probe_loss/wiki, tasks/arc/acc_norm: whatever the loop writes to eval.json is drawn."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    walk("", {k: v for k, v in record.items() if k != "step"})
    return out


def run_label(run_uri: str) -> str:
    return run_uri.rstrip("/").rsplit("/", 1)[-1]


def compare_panels(runs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> list[str]:
    """The panels of an overlay, in order: train loss, each eval series (first seen first), LR."""
    series: dict[str, None] = {}
    for _, evals in runs.values():
        for record in evals:
            series.update(dict.fromkeys(eval_series(record)))
    # Losses first, then what is derived from them (eval.json's keys are sorted alphabetically).
    order = {head: i for i, head in enumerate(("loss", "probe_loss", "forgetting", "relative_forgetting"))}
    ranked = sorted(series, key=lambda s: (order.get(s.split("/", 1)[0], len(order)), list(series).index(s)))
    has_train = any(train for train, _ in runs.values())
    return (["train/loss"] if has_train else []) + [f"eval/{s}" for s in ranked] + (["train/lr"] if has_train else [])


def plot_runs(run_uris: list[str], output: str) -> str:
    """One PNG overlaying runs: a panel per series (train loss, every eval series of eval.json:
    per-domain loss, forgetting, probes, tasks; LR), one colour per run. Returns `output`."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    runs = {}
    for uri in run_uris:
        train, evals = read_train_log(uri), read_eval_history(uri)
        if not train and not evals:
            raise PlotError(f"{uri}: no metrics yet (metrics/train.jsonl, metrics/eval.json); "
                            "is this a run folder that has trained?")
        runs[uri] = (train, evals)
    panels = compare_panels(runs)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        kind, _, name = panel.partition("/")
        for i, (uri, (train, evals)) in enumerate(runs.items()):
            if kind == "train":
                pts = [(r["step"], r[name]) for r in train if r.get(name) is not None]
            else:
                pts = [(e["step"], v) for e in evals if (v := eval_series(e).get(name)) is not None]
            if pts:
                ax.plot([p for p, _ in pts], [v for _, v in pts], color=colours[i % len(colours)], lw=1.6,
                        marker="o" if kind == "eval" else None, ms=3, label=run_label(uri))
        ax.set_title(_panel_title(panel), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * rows)))
    return _save_png(fig, plt, output)


def _panel_title(panel: str) -> str:
    kind, _, name = panel.partition("/")
    if kind == "train":
        return {"loss": "train loss (blend)", "lr": "learning rate"}.get(name, f"train {name}")
    head, _, rest = name.partition("/")
    titles = {"loss": "eval loss: {}", "forgetting": "forgetting (loss - step 0): {}", "probe_loss": "probe loss: {}"}
    return titles[head].format(rest) if head in titles and rest else f"eval {name.replace('/', ' ')}"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a cluster node or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("raycpt plot needs matplotlib: pip install 'raycpt[plot]'") from None
    return plt


def _save_png(fig, plt, output: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(output if "://" in output else _abs(output), buf.getvalue())
    return output


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
    draw_probes(ax_loss, evals)
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
    draw_tasks(ax_lr, evals)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(output if "://" in output else _abs(output), buf.getvalue())
    return output


def draw_probes(ax, evals: list[dict[str, Any]]) -> None:
    """Probe losses (eval-only sets, never trained on) as dotted lines, labelled with their
    relative rise since step 0."""
    for name in (evals[-1].get("probe_loss", {}) if evals else {}):
        pts = [(e["step"], e["probe_loss"][name]) for e in evals if name in e.get("probe_loss", {})]
        rise = evals[-1].get("relative_forgetting", {}).get(name)
        ax.plot([p for p, _ in pts], [v for _, v in pts], marker="s", lw=2, ls=":",
                label=f"probe {name}" + (f" ({100 * rise:+.1f}% vs step 0)" if rise is not None else ""))


def draw_tasks(ax, evals: list[dict[str, Any]]) -> None:
    """Multiple-choice accuracy (acc_norm) per task on a right-hand axis."""
    names = sorted({n for e in evals for n in e.get("tasks", {})})
    if not names:
        return
    twin = ax.twinx()
    for name in names:
        pts = [(e["step"], e["tasks"][name]["acc_norm"]) for e in evals if name in e.get("tasks", {})]
        twin.plot([p for p, _ in pts], [v for _, v in pts], marker="^", lw=1.5, label=f"task {name} acc_norm")
    twin.set_ylabel("task accuracy")
    twin.legend(loc="upper right", fontsize=7)


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------------
# `raycpt plot SWEEP`: the Pareto front of adaptation vs forgetting


def plot_sweep(sweep_uri: str, output: str) -> str:
    """One PNG: every evaluated trial at (worst forgetting, new-domain loss), the Pareto front
    joined, the forgetting budget as a vertical line, the best (or closest) trial marked; trials
    stopped early are hollow (their losses come from fewer steps)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("raycpt plot needs matplotlib: pip install 'raycpt[plot]'") from None
    from raycpt.tune.results import sweep_status

    summary, _ = sweep_status(sweep_uri)
    rows = [r for r in summary.rows if r.new_loss is not None]
    if not rows:
        raise PlotError(f"{sweep_uri}: no trial has an evaluation yet; plot again once trials have run")
    o = summary.objective
    scale = 100.0 if o.relative else 1.0
    fig, ax = plt.subplots(figsize=(8.5, 6))
    for r in rows:
        x = scale * (r.forgetting or 0.0)
        color = "tab:blue" if r.within_budget is None else ("tab:green" if r.within_budget else "tab:red")
        done = r.status == "done"
        ax.scatter([x], [r.new_loss], s=140 if r.best or r.closest else 60, marker="*" if r.best else "o",
                   facecolors=color if done else "none", edgecolors=color, zorder=3)
        ax.annotate(r.trial_id + (" (job)" if r.baseline else ""), (x, r.new_loss), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.forgetting or 0.0)
    if len(front) > 1:
        ax.plot([scale * (r.forgetting or 0.0) for r in front], [r.new_loss for r in front], color="0.4", lw=1,
                ls="--", zorder=2, label="Pareto front")
    if o.kind == "budget":
        ax.axvline(scale * o.forgetting_budget, color="tab:red", lw=1, ls=":",
                   label=f"forgetting budget {scale * o.forgetting_budget:g}{'%' if o.relative else ' nats'}")
    ax.scatter([], [], color="tab:green", label="within budget")
    if o.kind == "budget":
        ax.scatter([], [], color="tab:red", label="over budget")
    ax.scatter([], [], facecolors="none", edgecolors="0.3", label="stopped early")
    over = " / ".join(o.over)
    ax.set_xlabel(f"worst forgetting over {over} ({'% of the step-0 loss' if o.relative else 'nats'})")
    ax.set_ylabel("new-domain held-out loss (nats/token)")
    best = summary.best or summary.closest
    note = ((f"best: {best.trial_id}" if summary.best else f"none within budget; closest: {best.trial_id}")
            if best else "")
    ax.set_title(f"sweep {summary.name}: adaptation vs forgetting  {note}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(output if "://" in output else _abs(output), buf.getvalue())
    return output
