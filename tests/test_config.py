from pathlib import Path

import pytest

from raycpt.config import ConfigError, apply_overrides, load_job, parse_job, source_weights

REPO = Path(__file__).resolve().parents[1]


def minimal() -> dict:
    return {
        "run": {"name": "r1", "storage": "/tmp/x"},
        "model": {"base": "/tmp/base"},
        "data": {"seq_len": 16, "sources": [{"name": "a", "path": "/d/a", "weight": 3},
                                            {"name": "b", "path": "/d/b", "weight": 1}]},
        "train": {"global_batch_size": 8, "max_steps": 10},
        "optim": {"peak_lr": 1e-4},
        "checkpoint": {"interval_steps": 5},
    }


def test_every_shipped_job_yaml_loads():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        if path.name.startswith("sweep"):
            continue
        job = load_job(path)
        assert job.run.name and job.train.max_steps > 0, path


def test_dotted_overrides_reach_nested_and_indexed_keys():
    tree = apply_overrides(minimal(), ["train.max_steps=20", "data.sources[1].weight=0.5", "optim.peak_lr=3e-4",
                                       "scaling.num_workers=[1, 2]"])
    job = parse_job(tree)
    assert job.train.max_steps == 20
    assert job.data.sources[1].weight == 0.5
    assert job.optim.peak_lr == 3e-4
    assert job.worker_range() == (1, 2)


def test_unknown_keys_and_bad_values_are_all_reported_with_dotted_paths():
    tree = minimal()
    tree["train"]["max_stepz"] = 3
    tree["optim"]["peak_lr"] = -1
    tree["data"]["sources"][1]["weight"] = -2
    with pytest.raises(ConfigError) as e:
        parse_job(tree)
    msg = str(e.value)
    assert "train.max_stepz: unknown key" in msg
    assert "optim.peak_lr" in msg


def test_an_unknown_key_is_answered_with_the_nearest_known_key():
    tree = minimal()
    tree["train"]["max_stepz"] = 3
    tree["data"]["sources"][0]["wieght"] = 1
    tree["checkpoint"]["zzz"] = 1
    with pytest.raises(ConfigError) as e:
        parse_job(tree)
    msg = str(e.value)
    assert "train.max_stepz: unknown key; did you mean train.max_steps?" in msg, msg
    assert "data.sources[0].wieght: unknown key; did you mean data.sources[0].weight?" in msg, msg
    assert "checkpoint.zzz: unknown key; the keys here are async_save, " in msg and "interval_steps" in msg, msg
    assert "--help-config" not in msg


def test_cross_field_problems_name_the_key_and_fix():
    tree = minimal()
    tree["data"]["sources"][1]["weight"] = -2
    tree["scaling"] = {"num_workers": 3}
    with pytest.raises(ConfigError) as e:
        parse_job(tree)
    msg = str(e.value)
    assert "data.sources[1].weight: must be > 0" in msg
    assert "train.global_batch_size" in msg and "multiple" in msg


def test_an_elastic_range_is_checked_at_every_size_not_only_its_ends():
    tree = minimal()  # global batch 8, micro batch 1: 2 and 4 workers split it, 3 do not
    tree["scaling"] = {"num_workers": [2, 4]}
    with pytest.raises(ConfigError) as e:
        parse_job(tree)
    msg = str(e.value)
    assert "scaling.num_workers: [2, 4] includes 3 worker(s)" in msg, msg
    assert "2 or 4" in msg and "e.g. 12" in msg, msg
    tree["train"]["global_batch_size"] = 12
    assert parse_job(tree).worker_range() == (2, 4)


def test_missing_section_is_named():
    tree = minimal()
    del tree["checkpoint"]
    with pytest.raises(ConfigError, match="checkpoint: required"):
        parse_job(tree)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(minimal(), ["train.max_steps"])


def test_replay_ratio_shorthand_splits_by_role():
    tree = minimal()
    tree["data"]["replay_ratio"] = 0.2
    tree["data"]["sources"] = [{"name": "new", "path": "/n", "role": "new"},
                               {"name": "old1", "path": "/o1", "role": "replay", "weight": 3},
                               {"name": "old2", "path": "/o2", "role": "replay", "weight": 1}]
    job = parse_job(tree)
    assert source_weights(job.data) == pytest.approx([0.8, 0.15, 0.05])


def test_weights_normalise_and_phases_validate():
    tree = minimal()
    tree["data"]["phases"] = [{"start_step": 5, "weights": {"a": 1, "zzz": 1}}]
    with pytest.raises(ConfigError, match=r"data.phases\[0\].weights.zzz: no such source"):
        parse_job(tree)
    job = parse_job(minimal())
    assert source_weights(job.data) == pytest.approx([0.75, 0.25])


def test_relative_paths_resolve_against_the_yaml(tmp_path):
    import yaml

    tree = minimal()
    tree["run"]["storage"] = "runs"
    tree["data"]["sources"][0]["path"] = "data/a"
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(tree))
    job = load_job(p)
    assert job.run.storage == str(tmp_path / "runs")
    assert job.data.sources[0].path == str(tmp_path / "data" / "a")
    assert job.run_uri == str(tmp_path / "runs" / "r1")
