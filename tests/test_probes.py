"""Probes and multiple-choice tasks end to end: an eval-only source from `prepare --eval-fraction 1`,
one real 4-step run (1 CPU worker, local Ray) that evaluates a probe and a task at step 0, 2 and
4 without ever training on the probe, and what reads the results: eval.json, TensorBoard,
`raycpt status`, `raycpt plot`, `raycpt eval` on the run and on the base model's HF folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_logged, sample_log, tiny_job_tree
from raycpt import storage
from raycpt.config import ConfigError, parse_job

REPO = Path(__file__).resolve().parents[1]
CLOZE = str(REPO / "jobs" / "tasks" / "pydoc-cloze.jsonl")


@pytest.fixture(scope="module")
def probe_source(tmp_path_factory, tokenizer_dir, ray_local) -> str:
    """pydoc topics the replay source does not hold (it has the first 30), all rows held out."""
    import pydoc_data.topics as topics

    from raycpt.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("probe")
    text = root / "probe.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.topics.items())[30:45]))
    out = str(root / "topics-probe")
    prepare(PrepareOptions(inputs=(str(text),), tokenizer_dir=tokenizer_dir, seq_len=64, output=out,
                           eval_fraction=1.0, group_bytes=64 << 10, rows_per_row_group=16), log=lambda m: None)
    return out


def _probed_tree(storage_uri: str, tiny_model: str, prepared_sources: dict, probe: str, **sections) -> dict:
    return tiny_job_tree(storage_uri, tiny_model, prepared_sources, run={"name": "probed"},
                         train={"global_batch_size": 4, "max_steps": 4}, scaling={"num_workers": 1},
                         eval={"interval_steps": 2, "max_rows": 4, "probes": [{"name": "topics", "path": probe}],
                               "tasks": [{"name": "cloze", "path": CLOZE, "max_items": 6}]}, **sections)


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, tiny_model, prepared_sources, probe_source) -> tuple[dict, str]:
    tree = _probed_tree(str(tmp_path_factory.mktemp("probed")), tiny_model, prepared_sources, probe_source)
    result = run_logged(tree, local_stream=True)
    assert result.error is None, result.error
    return tree, parse_job(tree).run_uri


def test_eval_only_source_is_a_probe_and_never_a_training_source(probe_source, tiny_model, prepared_sources,
                                                                tmp_path):
    from raycpt.data.manifest import DataError, read_manifest
    from raycpt.launch import preflight

    m = storage.read_json(storage.join(probe_source, "manifest.json"))
    assert m["splits"]["train"]["rows"] == 0 and m["splits"]["eval"]["rows"] > 0 and m["eval_only"] is True
    assert read_manifest(probe_source, "eval.probes[0].path", for_training=False).eval.rows > 0

    tree = tiny_job_tree(str(tmp_path), tiny_model, prepared_sources)
    tree["data"]["sources"][1]["path"] = probe_source
    with pytest.raises(DataError, match=r"data.sources\[1\].path: .* no training rows, "
                                        r"it holds only held-out rows .* eval.probes"):
        preflight(parse_job(tree))

    clash = _probed_tree(str(tmp_path), tiny_model, prepared_sources, prepared_sources["english"])
    clash["eval"]["probes"].append({"name": "code", "path": probe_source})
    with pytest.raises(ConfigError) as e:
        parse_job(clash)
    assert "eval.probes[0].path:" in str(e.value) and "is also in data.sources" in str(e.value)
    assert "eval.probes[1].name: 'code' is already a source" in str(e.value)

    bad_task = _probed_tree(str(tmp_path), tiny_model, prepared_sources, probe_source)
    bad_task["eval"]["tasks"][0]["path"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"eval.tasks\[0\].path: .*missing.jsonl does not exist"):
        preflight(parse_job(bad_task))


def test_probe_and_task_are_evaluated_at_step_0_every_interval_and_the_end(probed_run):
    from test_lora import read_tb_scalars

    tree, run_uri = probed_run
    history = storage.read_json(storage.join(run_uri, "metrics", "eval.json"))
    assert [h["step"] for h in history] == [0, 2, 4]
    first, last = history[0], history[-1]
    assert set(first["probe_loss"]) == {"topics"} and first["probe_forgetting"] == {"topics": 0.0}
    topics_change = last["probe_loss"]["topics"] - first["probe_loss"]["topics"]
    assert last["probe_forgetting"]["topics"] == pytest.approx(topics_change)
    assert last["relative_forgetting"]["topics"] == pytest.approx(
        last["probe_forgetting"]["topics"] / first["probe_loss"]["topics"])
    assert set(last["relative_forgetting"]) == {"english", "topics"}  # replay sources and probes
    assert all(h["tasks"]["cloze"]["items"] == 6 for h in history)
    assert 0 <= last["tasks"]["cloze"]["acc"] <= 1 and last["tasks"]["cloze"]["chance"] == 0.25

    # Never trained on: not in the blend, no sample of it in any step.
    from raycpt.checkpoint.layout import TRAIN_STATE, latest_committed
    from raycpt.data.plan import split_sample_id

    state = storage.read_json(storage.join(latest_committed(run_uri).uri, TRAIN_STATE))
    assert set(state["tokens_per_source"]) == {"code", "english"}
    assert state["eval_history"] == history
    sources_trained = {split_sample_id(i)[0] for ids in sample_log(run_uri).values() for i in ids}
    assert sources_trained == {0, 1}

    tb = read_tb_scalars(storage.local_path(storage.join(run_uri, "metrics", "tb")))
    assert sorted(tb["eval/topics/loss"]) == [0, 2, 4]
    assert tb["eval/topics/relative_forgetting"][4] == pytest.approx(last["relative_forgetting"]["topics"], abs=1e-6)
    assert sorted(tb["task/cloze/acc_norm"]) == [0, 2, 4]


def test_status_and_plot_show_probes_and_tasks(probed_run, tmp_path, capsys):
    from raycpt.cli import main

    _, run_uri = probed_run
    assert main(["status", run_uri]) == 0
    out = capsys.readouterr().out
    assert "topics (probe)" in out and "cloze acc (task)" in out and "cloze acc_norm (task)" in out
    png = tmp_path / "run.png"
    assert main(["plot", run_uri, "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raycpt_eval_on_the_run_and_on_the_base_hf_folder(probed_run, tiny_model, tmp_path, capsys):
    from raycpt.cli import main

    tree, run_uri = probed_run
    history = storage.read_json(storage.join(run_uri, "metrics", "eval.json"))
    # The run: its newest checkpoint, its own eval sets, changes against its step 0.
    assert main(["eval", run_uri, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kind"] == "checkpoint" and got["step"] == 4
    rec = got["record"]
    assert rec["probe_loss"]["topics"] == pytest.approx(history[-1]["probe_loss"]["topics"], abs=1e-4)
    assert rec["loss"] == pytest.approx(history[-1]["loss"], abs=1e-4)
    assert rec["tasks"]["cloze"]["acc"] == history[-1]["tasks"]["cloze"]["acc"]
    assert got["baseline"] == history[0]
    assert main(["eval", run_uri]) == 0
    table = capsys.readouterr().out
    assert "topics" in table and "probe" in table and "cloze" in table and "%" in table

    # The base model's HF folder with the job's eval sets gives the run's step-0 numbers; an extra
    # --task is added on the command line.
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(tree))
    assert main(["eval", tiny_model, "--job", str(job_yaml), "--task", f"cloze3={CLOZE}", "--max-rows", "4",
                 "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["record"]
    assert base["probe_loss"]["topics"] == pytest.approx(history[0]["probe_loss"]["topics"], abs=1e-4)
    assert base["loss"] == pytest.approx(history[0]["loss"], abs=1e-4)
    assert base["tasks"]["cloze"] == history[0]["tasks"]["cloze"]
    assert base["tasks"]["cloze3"]["items"] == 200

    assert main(["eval", tiny_model]) == 2  # an HF folder has no eval sets of its own
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_scores_trials_on_the_probe_within_a_forgetting_budget(tmp_path, tiny_model, prepared_sources,
                                                                     probe_source):
    """One trial of a real sweep: Tune receives the objective of the budget form, computed from
    the probe and the replay source, at every evaluation."""
    from raycpt.tune.config import parse_sweep
    from raycpt.tune.sweep import run_sweep

    tree = _probed_tree(str(tmp_path / "runs"), tiny_model, prepared_sources, probe_source,
                        checkpoint={"interval_steps": 4, "keep_last": 1})
    tree["eval"]["tasks"] = []
    tree["tune"] = {"name": "budget-sweep", "space": {"optim.peak_lr": {"loguniform": [1e-5, 1e-4]}},
                    "num_samples": 1, "evaluate_job_config": False, "max_concurrent_trials": 1,
                    "scheduler": {"kind": "fifo"},
                    "objective": {"forgetting_budget": 0.5, "relative": True, "over": ["probes", "replay"]}}
    job, tune = parse_sweep(tree, tmp_path)
    out = run_sweep(job, tune, loop_options={"local_stream": True})
    assert out["errors"] == 0 and len(out["trials"]) == 1
    for t in out["trials"]:
        assert set(t["forgetting_by"]) == {"english", "topics"} and t["within_budget"] is True
        assert t["objective"] == pytest.approx(t["new_loss"])
        result_file = tmp_path / "runs" / "budget-sweep" / f"tune-{t['trial_id']}" / "result.json"
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert [r["step"] for r in results] == [0, 2, 4]  # one Tune result per evaluation
        assert all(r["within_budget"] == 1.0 and "forgetting/topics" in r for r in results)
        assert results[-1]["forgetting/topics"] == pytest.approx(t["forgetting_by"]["topics"], abs=1e-6)
    assert out["best_trial"] is not None
    assert storage.exists(storage.join(out["uri"], "best.yaml"))
