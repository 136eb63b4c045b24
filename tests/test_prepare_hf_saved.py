"""`raycpt prepare` on folders written by HF `datasets` `save_to_disk` (Arrow IPC stream files +
state.json), read with pyarrow: the same tokens as the same texts given as jsonl."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycpt.data.manifest import DataError, read_manifest
from raycpt.data.prepare import PrepareOptions, expand_inputs, prepare

datasets = pytest.importorskip("datasets")


def topic_texts(limit: int) -> list[str]:
    import pydoc_data.topics as topics

    return [text for _, text in sorted(topics.topics.items())[:limit]]


def train_ids(folder) -> np.ndarray:
    man = read_manifest(str(folder))
    return np.concatenate([np.asarray(pq.read_table(str(folder / f.path)).column(0).to_pylist())
                           for f in man.train.files])


def test_a_save_to_disk_folder_prepares_like_the_same_texts_in_jsonl(tmp_path, tokenizer_dir, ray_local):
    texts = topic_texts(40)
    saved = tmp_path / "hf-topics"
    ds = datasets.Dataset.from_dict({"id": list(range(len(texts))), "content": texts})
    ds.save_to_disk(str(saved), max_shard_size="40KB")
    arrows = sorted(p.name for p in saved.glob("*.arrow"))
    assert len(arrows) >= 2, "several shards, so their order matters"
    assert [u.rsplit("/", 1)[-1] for u, _ in expand_inputs([str(saved)])] == arrows  # no state.json etc.
    jsonl = tmp_path / "topics.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))

    opts = dict(tokenizer_dir=tokenizer_dir, seq_len=32, text_column="content", group_bytes=64 << 20)
    m_hf = prepare(PrepareOptions(inputs=(str(saved),), output=str(tmp_path / "from-hf"), **opts), log=lambda m: None)
    m_js = prepare(PrepareOptions(inputs=(str(jsonl),), output=str(tmp_path / "from-jsonl"), **opts),
                   log=lambda m: None)
    assert m_hf["documents"] == len(texts) == m_js["documents"]
    assert m_hf["tokens"] == m_js["tokens"] > 0
    assert np.array_equal(train_ids(tmp_path / "from-hf"), train_ids(tmp_path / "from-jsonl"))

    # A DatasetDict folder: every split, in dataset_dict.json's order.
    both = tmp_path / "hf-dict"
    splits = {"train": ds.select(range(30)), "validation": ds.select(range(30, 40))}
    datasets.DatasetDict(splits).save_to_disk(str(both))
    files = [u for u, _ in expand_inputs([str(both)])]
    assert [u.split("/")[-2] for u in files] == ["train", "validation"]


def test_a_missing_text_column_is_refused_listing_the_columns(tmp_path, tokenizer_dir):
    saved = tmp_path / "hf"
    datasets.Dataset.from_dict({"id": [1, 2], "content": ["a b c", "d e f"]}).save_to_disk(str(saved))
    opts = dict(inputs=(str(saved),), tokenizer_dir=tokenizer_dir, seq_len=8, output=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['id', 'content'\]; pass --text-column"):
        prepare(PrepareOptions(**opts), log=lambda m: None)
    with pytest.raises(DataError, match=r"column 'id' holds int64, not text"):
        prepare(PrepareOptions(**opts, text_column="id"), log=lambda m: None)
    assert not (tmp_path / "o").exists()  # refused before anything is written
