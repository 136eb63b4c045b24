import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import STDLIB, write_english_jsonl
from raycpt.data.manifest import DataError, check_against_model, read_manifest, tokenizer_identity
from raycpt.data.prepare import PrepareOptions, prepare


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f.endswith(".parquet"):
                h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_prepare_packs_real_text_deterministically(tmp_path, tokenizer_dir, ray_local):
    from transformers import AutoTokenizer

    src = write_english_jsonl(tmp_path / "in" / "topics.jsonl", limit=12)
    opts = dict(inputs=(str(src), os.path.join(STDLIB, "json")), tokenizer_dir=tokenizer_dir, seq_len=32,
                eval_fraction=0.2, group_bytes=32 << 10, rows_per_row_group=8)
    m1 = prepare(PrepareOptions(output=str(tmp_path / "a"), **opts), log=lambda m: None)
    m2 = prepare(PrepareOptions(output=str(tmp_path / "b"), **opts), log=lambda m: None)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert m1["splits"] == m2["splits"]
    man = read_manifest(str(tmp_path / "a"))
    assert man.seq_len == 32 and man.train.rows > 0 and man.eval.rows > 0
    assert m1["tokens"] == (man.train.rows + man.eval.rows) * 32
    assert m1["documents"] > 12
    # Rows are real tokens: decoding the first row gives text from the inputs, EOS between documents.
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = pq.read_table(str(tmp_path / "a" / man.train.files[0].path))
    assert table.schema.field("input_ids").type.list_size == 32
    assert pq.ParquetFile(str(tmp_path / "a" / man.train.files[0].path)).metadata.row_group(0).num_rows <= 8
    ids = np.concatenate([np.asarray(r) for r in table.column(0).to_pylist()])
    assert tok.eos_token_id in ids
    assert len(tok.decode(ids[:32]).strip()) > 10
    # Same inputs again: nothing to do; different inputs into the same folder: refused.
    prepare(PrepareOptions(output=str(tmp_path / "a"), **opts), log=lambda m: None)
    with pytest.raises(DataError, match="holds a different dataset"):
        prepare(PrepareOptions(output=str(tmp_path / "a"), **{**opts, "seq_len": 16}), log=lambda m: None)


def test_held_out_split_shares_no_document(tmp_path, tokenizer_dir, ray_local):
    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(60):
            f.write(json.dumps({"body": f"document number {i} " + "word " * 40}) + "\n")
    m = prepare(PrepareOptions(inputs=(str(src),), tokenizer_dir=tokenizer_dir, seq_len=16, output=str(tmp_path / "o"),
                               text_column="body", eval_fraction=0.25), log=lambda m: None)
    ev, tr = m["splits"]["eval"], m["splits"]["train"]
    assert ev["documents"] + tr["documents"] == 60
    assert 0 < ev["documents"] < 30


def test_bad_inputs_get_clear_errors(tmp_path, tokenizer_dir, ray_local):
    with pytest.raises(DataError, match="does not exist"):
        prepare(PrepareOptions(inputs=(str(tmp_path / "nope"),), tokenizer_dir=tokenizer_dir, seq_len=16,
                               output=str(tmp_path / "o1")), log=lambda m: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(Exception, match="no field 'text'"):
        prepare(PrepareOptions(inputs=(str(bad),), tokenizer_dir=tokenizer_dir, seq_len=16,
                               output=str(tmp_path / "o2")), log=lambda m: None)
    assert not (tmp_path / "o2" / "manifest.json").exists()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(DataError, match="no full row"):
        prepare(PrepareOptions(inputs=(str(tiny),), tokenizer_dir=tokenizer_dir, seq_len=64,
                               output=str(tmp_path / "o3")), log=lambda m: None)
    with pytest.raises(DataError, match="does not exist|no manifest.json"):
        read_manifest(str(tmp_path / "o3"))


def test_manifest_is_checked_against_the_model(prepared_sources, tokenizer_dir, tiny_model):
    from transformers import AutoTokenizer

    man = read_manifest(prepared_sources["code"])
    tok_id = tokenizer_identity(AutoTokenizer.from_pretrained(tokenizer_dir), "x")
    assert check_against_model(man, "data.sources[0].path", 64, tok_id, 49152) == []
    problems = check_against_model(man, "data.sources[0].path", 128, {**tok_id, "vocab_fingerprint": "other"}, 1000)
    assert any("data.seq_len" in p for p in problems)
    assert any("differs from the model's tokenizer" in p for p in problems)
    assert any("exceeds the model's" in p for p in problems)


def test_caches_and_binary_files_are_not_documents(tmp_path, tokenizer_dir, ray_local):
    root = tmp_path / "tree"
    (root / "__pycache__").mkdir(parents=True)
    (root / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    (root / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00\x01garbage" * 100)
    (root / "blob.dat").write_bytes(b"\x00" * 100 + b"text" * 100)
    m = prepare(PrepareOptions(inputs=(str(root),), tokenizer_dir=tokenizer_dir, seq_len=16,
                               output=str(tmp_path / "o")), log=lambda m: None)
    assert m["source_files"] == 2  # a.py and blob.dat; the cache folder is skipped
    assert m["documents"] == 1  # blob.dat holds NUL bytes: not text


def _broken_copy(src: str, dst, break_it) -> str:
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    first = manifest["splits"]["train"]["files"][0]
    break_it(dst / first["path"], first["rows"], manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


def test_broken_shards_are_named_before_any_worker_starts(tmp_path, prepared_sources, tiny_model):
    """preflight (the driver, before Ray Train starts) reads every shard footer."""
    import pyarrow as pa

    from conftest import tiny_job_tree
    from raycpt.config import parse_job
    from raycpt.data.prepare import write_rows
    from raycpt.launch import preflight

    def truncate(path, rows, manifest):
        path.write_bytes(path.read_bytes()[:200])

    def wrong_schema(path, rows, manifest):
        pq.write_table(pa.table({"tokens": pa.array([[1] * 32] * rows, pa.list_(pa.int64()))}), path)

    def token_beyond_vocab(path, rows, manifest):
        data = np.ones((rows, 64), dtype=np.int64)
        data[rows // 2, 7] = 60_000
        write_rows(str(path), data, 64, 16)

    def fewer_rows(path, rows, manifest):
        write_rows(str(path), np.ones((rows - 1, 64), dtype=np.int64), 64, 16)

    def other_tokenizer(path, rows, manifest):
        manifest["tokenizer"]["vocab_fingerprint"] = "0123456789abcdef"

    def empty(path, rows, manifest):
        manifest["splits"]["train"] = {"files": [], "rows": 0, "tokens": 0, "documents": 0, "dropped_tokens": 0}

    cases = {truncate: "not readable Parquet", wrong_schema: "has schema", token_beyond_vocab: "token id 60000",
             fewer_rows: "rows but the manifest says", other_tokenizer: "differs from the model's tokenizer",
             empty: "no training rows"}
    for break_it, expected in cases.items():
        broken = _broken_copy(prepared_sources["code"], tmp_path / break_it.__name__, break_it)
        tree = tiny_job_tree(str(tmp_path / "runs"), tiny_model, {**prepared_sources, "code": broken})
        with pytest.raises(DataError, match=expected) as e:
            preflight(parse_job(tree))
        assert "data.sources[0].path" in str(e.value), str(e.value)
        if break_it not in (other_tokenizer, empty):
            assert broken in str(e.value), "the error should name the shard"
        assert not os.path.exists(tmp_path / "runs" / "tiny" / "checkpoints"), "nothing may start"
