"""`raycpt plot RUN1 RUN2 ...`: runs overlaid in one PNG, a panel per series found in their metrics."""

from __future__ import annotations

import json

import pytest

from raycpt.plot import compare_panels, eval_series, read_eval_history
from raycpt.train.logbook import MetricsLog, read_train_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, replay: float, probes: bool) -> str:
    """A run's metrics as the loop leaves them: train.jsonl through MetricsLog, eval.json beside it."""
    run = str(folder)
    log = MetricsLog(run, folder.name, 0, rank=0, tensorboard=False)
    for step in range(1, 9):
        log.train({"step": step, "max_steps": 8, "loss": 3.0 - 0.1 * step - replay, "lr": 1e-4 * min(step, 2) / 2,
                   "grad_norm": 1.0, "tokens_per_s": 100.0, "data_wait_share": 0.0, "checkpoint_stall_s": 0.0})
    log.close()
    history = []
    for step in (0, 4, 8):
        record = {"step": step, "loss": {"code": 2.5 - 0.05 * step, "english": 3.0 + (0.02 - replay / 10) * step},
                  "forgetting": {"english": (0.02 - replay / 10) * step}}
        if probes:
            record["probe_loss"] = {"wiki": 3.2 + 0.01 * step}
            record["tasks"] = {"arc": {"acc_norm": 0.3 - 0.001 * step}}
        history.append(record)
    (folder / "metrics" / "eval.json").write_text(json.dumps(history))
    return run


def test_eval_series_flattens_every_number_of_a_record():
    record = {"step": 4, "loss": {"code": 2.0}, "forgetting": {"english": 0.1},
              "probe_loss": {"wiki": 3.0}, "tasks": {"arc": {"acc_norm": 0.3, "n": 100}}, "note": "x"}
    assert eval_series(record) == {"loss/code": 2.0, "forgetting/english": 0.1, "probe_loss/wiki": 3.0,
                                   "tasks/arc/acc_norm": 0.3, "tasks/arc/n": 100.0}


def test_plot_of_two_runs_overlays_them_with_a_panel_per_series(tmp_path):
    pytest.importorskip("matplotlib")
    from raycpt.cli import main

    replay = write_run(tmp_path / "demo", 0.25, probes=True)
    plain = write_run(tmp_path / "demo-no-replay", 0.0, probes=False)
    runs = {u: (read_train_log(u), read_eval_history(u)) for u in (replay, plain)}
    assert compare_panels(runs) == ["train/loss", "eval/loss/code", "eval/loss/english", "eval/forgetting/english",
                                    "eval/probe_loss/wiki", "eval/tasks/arc/acc_norm", "train/lr"]
    png = tmp_path / "compare.png"
    assert main(["plot", replay, plain, "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 30_000
    # One run: the single-run plot, as before.
    single = tmp_path / "single.png"
    assert main(["plot", replay, "--output", str(single)]) == 0
    assert single.read_bytes()[:8] == PNG_MAGIC


def test_plot_of_a_run_without_metrics_names_it(tmp_path, capsys):
    from raycpt.cli import main

    replay = write_run(tmp_path / "demo", 0.25, probes=False)
    (tmp_path / "empty").mkdir()
    assert main(["plot", replay, str(tmp_path / "empty"), "--output", str(tmp_path / "x.png")]) == 2
    assert "empty: no metrics yet" in capsys.readouterr().err


def test_the_demo_draws_its_runs_into_one_png_and_says_where(tmp_path):
    pytest.importorskip("matplotlib")
    from raycpt.demo import compare_plot

    runs = [write_run(tmp_path / "demo", 0.25, probes=False), write_run(tmp_path / "demo-no-replay", 0.0, False)]
    out = tmp_path / "demo-runs.png"
    assert compare_plot(runs, str(out)) == f"plot of both runs: {out}   (raycpt plot RUN1 RUN2 ... draws any runs)"
    assert out.read_bytes()[:8] == PNG_MAGIC
