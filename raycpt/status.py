"""`raycpt status`: what a run has durably done, read from storage alone."""

from __future__ import annotations

from typing import Any

from raycpt import storage
from raycpt.checkpoint.integrity import read_train_state
from raycpt.checkpoint.layout import list_checkpoints


def run_status(run_uri: str) -> dict[str, Any]:
    entries = list_checkpoints(run_uri)
    committed = [e for e in entries if e.committed]
    st: dict[str, Any] = {
        "run": run_uri, "latest_step": None, "max_steps": None, "tokens_per_source": {},
        "checkpoints": [{"step": e.step, "uri": e.uri, "committed": e.committed} for e in entries],
        "last_eval": None, "first_eval": None, "world_size": None,
    }
    starts_uri = storage.join(run_uri, "metrics", "starts")
    st["starts"] = [storage.read_json(storage.join(starts_uri, n)) for n in storage.list_dir(starts_uri)]
    if committed:
        ts = read_train_state(committed[-1].uri)
        st.update(latest_step=ts.step, max_steps=ts.config["train"]["max_steps"],
                  tokens_per_source=ts.tokens_per_source, world_size=ts.world_size)
        history = ts.eval_history
        if history:
            st["first_eval"], st["last_eval"] = history[0], history[-1]
    return st


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['run']}"]
    if st["latest_step"] is None:
        lines.append("  no committed checkpoint yet")
        return "\n".join(lines)
    lines.append(f"  latest committed step {st['latest_step']}/{st['max_steps']} "
                 f"(written by {st['world_size']} workers)")
    total = sum(st["tokens_per_source"].values())
    for name, n in st["tokens_per_source"].items():
        lines.append(f"  tokens {name:<16} {n:>14,} ({100 * n / max(total, 1):.1f}%)")
    if st.get("starts"):
        last = st["starts"][-1]
        lines.append(f"  starts       {len(st['starts'])} ({len(st['starts']) - 1} restarts); "
                     f"the last: {last['kind']} at step {last['step']} on {last['world_size']} workers")
    lines.append("  checkpoints: " + ", ".join(f"{c['step']}{'' if c['committed'] else ' (incomplete)'}"
                                               for c in st["checkpoints"]))
    if st["last_eval"]:
        lines += format_eval_change(st["first_eval"], st["last_eval"])
    return "\n".join(lines)


def format_eval_change(first: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """Held-out sources, probes and tasks at step 0 and now, with the change (forgetting)."""
    lines = [f"  eval         {'step ' + str(first['step']):>12} {'step ' + str(last['step']):>12}   change"]
    for field, tag in (("loss", ""), ("probe_loss", " (probe)")):
        for name, loss in last.get(field, {}).items():
            was = first.get(field, {}).get(name)
            change = f"{loss - was:>+9.4f} {100 * (loss - was) / was:>+6.1f}%" if was else f"{'-':>9}"
            before = was if was is not None else float("nan")
            lines.append(f"  {(name + tag):<12} {before:>12.4f} {loss:>12.4f} {change}")
    for name, t in last.get("tasks", {}).items():
        was = first.get("tasks", {}).get(name)
        for metric in ("acc", "acc_norm"):
            b = was[metric] if was else float("nan")
            lines.append(f"  {name + ' ' + metric + ' (task)':<12} {b:>12.3f} {t[metric]:>12.3f} "
                         f"{t[metric] - b:>+9.3f}")
    return lines
