"""`raycpt prepare`: text -> packed Parquet token shards + manifest, on Ray Data.

Inputs are txt-like files (one file = one document), jsonl (one document per line, text in a
column), Parquet (a text column) or Hugging Face `datasets` folders written by `save_to_disk`
(Arrow files, a text column; read with pyarrow, raycpt/data/hf_saved.py), local or s3://, given
as files, folders or globs.
Files are sorted and cut into groups of about `group_bytes`; each group is one Ray Data task that
tokenizes its documents, joins them with EOS, packs them into rows of exactly `seq_len` tokens and
writes one shard per split. A document goes to the held-out split when a hash of (file, index)
falls under `eval_fraction`, so the split is deterministic and never shares a document with
training. The tail of a group shorter than one row is dropped (counted in the manifest).

Output is deterministic: the same inputs give byte-identical shards. `manifest.json` is written
last; a folder without it is not a dataset, so a killed prepare never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycpt import storage
from raycpt.data.hf_saved import (
    ARROW_SUFFIX,
    check_arrow_text_column,
    is_saved_dataset_metadata,
    iter_arrow_documents,
    saved_dataset_files,
)
from raycpt.data.manifest import MANIFEST_NAME, DataError, split_record, tokenizer_identity, write_manifest

TEXT_SUFFIXES_JSONL = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...]
    tokenizer_dir: str
    seq_len: int
    output: str
    text_column: str = "text"
    eval_fraction: float = 0.0
    group_bytes: int = 8 << 20
    rows_per_row_group: int = 64
    max_files: int | None = None
    s3_endpoint_url: str | None = None  # an S3-compatible store; AWS's endpoint when None


def expand_inputs(inputs: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """Sorted (uri, size_bytes) of every input file; folders are walked, globs expanded."""
    found: dict[str, int] = {}
    for item in inputs:
        fs, path = storage.filesystem(item)
        prefix = "s3://" if item.startswith("s3://") else ""
        try:
            if any(ch in path for ch in "*?["):
                matches = fs.glob(path, detail=True)
            elif fs.isdir(path):
                saved = saved_dataset_files(fs, path)  # an HF `datasets` save_to_disk folder (hf_saved.py)
                matches = {p: fs.info(p) for p in saved} if saved is not None else fs.find(path, detail=True)
            else:
                matches = {path: fs.info(path)}
        except FileNotFoundError:
            raise DataError(f"--input {item}: does not exist") from None
        except Exception as e:  # noqa: BLE001 - storage errors get a clear message
            raise DataError(f"--input {item}: cannot be listed ({type(e).__name__}: {e})") from None
        for p, info in matches.items():
            if info.get("type") == "directory" or _skipped(p) or is_saved_dataset_metadata(p, set(matches)):
                continue
            found[prefix + p] = int(info.get("size") or 0)
    if not found:
        raise DataError(f"--input {' '.join(inputs)}: no files found")
    return sorted(found.items())


_SKIP_DIRS = ("__pycache__", ".git", ".ipynb_checkpoints")
_BINARY_SUFFIXES = (".pyc", ".pyo", ".so", ".o", ".a", ".zip", ".gz", ".bz2", ".xz", ".zst", ".png", ".jpg",
                    ".jpeg", ".gif", ".pdf", ".exe", ".dll", ".bin", ".pt", ".safetensors", ".gguf")


def _skipped(path: str) -> bool:
    """Hidden files, caches and known binary formats are never text."""
    parts = path.replace("\\", "/").split("/")
    return (parts[-1].startswith(".") or any(p in _SKIP_DIRS for p in parts)
            or path.lower().endswith(_BINARY_SUFFIXES))


def group_files(files: list[tuple[str, int]], group_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for uri, nbytes in files:
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(uri)
        size += nbytes
    return groups


def iter_documents(uri: str, text_column: str) -> Iterator[str]:
    fs, path = storage.filesystem(uri)
    lower = uri.lower()
    try:
        if lower.endswith(ARROW_SUFFIX):
            yield from iter_arrow_documents(uri, text_column)
            return
        if lower.endswith(PARQUET_SUFFIXES):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            if text_column not in table.column_names:
                raise DataError(f"{uri}: no column {text_column!r} (has {table.column_names}); pass --text-column")
            for text in table.column(text_column).to_pylist():
                if text:
                    yield text
        elif lower.endswith(TEXT_SUFFIXES_JSONL):
            with fs.open(path, "rt", encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{uri}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(doc, dict) or text_column not in doc:
                        raise DataError(f"{uri}:{lineno}: no field {text_column!r}; pass --text-column")
                    if doc[text_column]:
                        yield str(doc[text_column])
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
            if b"\x00" in data[:8192]:
                return  # a binary file among the text: not a document
            text = data.decode("utf-8", errors="replace")
            if text.strip():
                yield text
    except DataError:
        raise
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{uri}: unreadable ({type(e).__name__}: {e})") from None


def _is_eval_doc(uri: str, index: int, eval_fraction: float) -> bool:
    if eval_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{os.path.basename(uri)}#{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < eval_fraction


def _shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema([pa.field("input_ids", pa.list_(pa.int32(), seq_len))])


def write_rows(uri: str, rows: np.ndarray, seq_len: int, rows_per_row_group: int) -> None:
    """Write packed rows as one Parquet shard (small row groups: readers pull only what they need)."""
    flat = pa.array(rows.reshape(-1).astype(np.int32), type=pa.int32())
    col = pa.FixedSizeListArray.from_arrays(flat, seq_len)
    table = pa.Table.from_arrays([col], schema=_shard_schema(seq_len))
    fs, path = storage.pyarrow_filesystem(uri)
    storage.makedirs(os.path.dirname(uri))
    pq.write_table(table, path, filesystem=fs, row_group_size=rows_per_row_group, compression="zstd")


class GroupPacker:
    """Ray Data UDF: tokenize one group of files, pack per split, write its shards."""

    def __init__(self, opts: PrepareOptions):
        from transformers import AutoTokenizer

        self.opts = opts
        storage.configure_storage(opts.s3_endpoint_url)  # this actor may run on another node
        self.tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer_dir)
        if self.tokenizer.eos_token_id is None:
            raise DataError(f"--tokenizer {opts.tokenizer_dir}: has no EOS token to join documents with")
        self.vocab_size = tokenizer_identity(self.tokenizer, "")["vocab_size"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("group", "split", "path", "rows", "tokens", "documents", "dropped")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        for group_id, files_json in zip(batch["group"], batch["files"]):
            for split, stats in self.pack_group(int(group_id), json.loads(files_json)).items():
                out["group"].append(int(group_id))
                out["split"].append(split)
                for k in ("path", "rows", "tokens", "documents", "dropped"):
                    out[k].append(stats[k])
        return {k: np.array(v) for k, v in out.items()}

    def pack_group(self, group_id: int, files: list[str]) -> dict[str, dict[str, Any]]:
        o = self.opts
        buffers: dict[str, list[np.ndarray]] = {"train": [], "eval": []}
        docs = {"train": 0, "eval": 0}
        eos = self.tokenizer.eos_token_id
        for uri in files:
            texts = list(iter_documents(uri, o.text_column))
            if not texts:
                continue
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for i, toks in enumerate(ids):
                split = "eval" if _is_eval_doc(uri, i, o.eval_fraction) else "train"
                buffers[split].append(np.asarray(toks + [eos], dtype=np.int64))
                docs[split] += 1
        result = {}
        for split, parts in buffers.items():
            stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if stream.size and int(stream.max()) >= self.vocab_size:
                raise DataError(f"group {group_id}: token id {int(stream.max())} >= vocab size {self.vocab_size}")
            n_rows = stream.size // o.seq_len
            rel = f"{split}/part-{group_id:05d}.parquet"
            if n_rows:
                write_rows(storage.join(o.output, rel), stream[: n_rows * o.seq_len].reshape(n_rows, o.seq_len),
                           o.seq_len, o.rows_per_row_group)
            result[split] = {"path": rel if n_rows else "", "rows": n_rows, "tokens": n_rows * o.seq_len,
                             "documents": docs[split], "dropped": int(stream.size - n_rows * o.seq_len)}
        return result


def input_fingerprint(files: list[tuple[str, int]], opts: PrepareOptions, tok_id: dict[str, Any]) -> str:
    d = {"files": [(os.path.basename(u), n) for u, n in files], "seq_len": opts.seq_len,
         "text_column": opts.text_column, "eval_fraction": opts.eval_fraction,
         "group_bytes": opts.group_bytes, "rows_per_row_group": opts.rows_per_row_group,
         "tokenizer": tok_id["vocab_fingerprint"]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_options(opts: PrepareOptions) -> list[tuple[str, int]]:
    """What `prepare` can refuse before Ray starts, each naming the flag: numbers in range, the
    tokenizer loads, --output is not a file, storage answers, inputs exist and are not all binary.
    Returns the input files."""
    from raycpt.model.hf import ModelError, load_tokenizer

    storage.configure_storage(opts.s3_endpoint_url)
    if opts.seq_len < 2:
        raise DataError("--seq-len: must be >= 2")
    if not 0 <= opts.eval_fraction <= 1:
        raise DataError("--eval-fraction: must be in [0, 1] (1: every document held out, an eval-only source "
                        "for eval.probes)")
    out_path = storage.local_path(opts.output)
    if out_path is not None and os.path.exists(out_path) and not os.path.isdir(out_path):
        raise DataError(f"--output {opts.output}: is a file; give a new folder (or one an earlier prepare wrote)")
    for uri, flag in [(opts.output, "--output"), *((i, "--input") for i in opts.inputs)]:
        storage.check_reachable(uri, flag)
    if not os.path.isdir(opts.tokenizer_dir):
        raise DataError(f"--tokenizer {opts.tokenizer_dir}: no such folder; give the base model's HF folder")
    try:
        load_tokenizer(opts.tokenizer_dir, key="--tokenizer")
    except ModelError as e:
        raise DataError(str(e)) from None
    files = expand_inputs(opts.inputs)
    binary = [u for u, _ in files if _looks_binary(u)]
    if binary and len(binary) == len(files):
        raise DataError(f"--input {' '.join(opts.inputs)}: {len(binary)} file(s) are binary, not text (e.g. "
                        f"{binary[0]}); give txt, jsonl or Parquet text")
    return files


def _looks_binary(uri: str) -> bool:
    if uri.lower().endswith((*PARQUET_SUFFIXES, ARROW_SUFFIX)):  # columnar files are binary by design
        return False
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False  # unreadable: iter_documents names it
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # not a multi-byte character cut by the 8 KB window
    return False


def prepare(opts: PrepareOptions, *, log=print) -> dict[str, Any]:
    """Run the preparation on the current Ray cluster; return the manifest (also written)."""
    import ray
    from transformers import AutoTokenizer

    files = check_options(opts)
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer_dir)
    tok_id = tokenizer_identity(tokenizer, os.path.basename(opts.tokenizer_dir.rstrip("/")))
    if opts.max_files:
        files = files[: opts.max_files]
    for uri in {os.path.dirname(u): u for u, _ in reversed(files) if u.endswith(ARROW_SUFFIX)}.values():
        check_arrow_text_column(uri, opts.text_column)  # one file per folder: fail before Ray starts
    fingerprint = input_fingerprint(files, opts, tok_id)
    manifest_uri = storage.join(opts.output, MANIFEST_NAME)
    if storage.exists(manifest_uri):
        existing = storage.read_json(manifest_uri)
        if existing.get("input_fingerprint") == fingerprint:
            log(f"prepare: {opts.output} already holds this dataset (fingerprint {fingerprint}); nothing to do")
            return existing
        raise DataError(
            f"--output {opts.output}: holds a different dataset (fingerprint {existing.get('input_fingerprint')} "
            f"vs {fingerprint}); choose another --output or delete it first"
        )
    # A DataError met by a packer (a broken jsonl line ...) reaches the CLI as itself, not inside
    # Ray Data's UserCodeException (whose pickled form loses the original).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    groups = group_files(files, opts.group_bytes)
    log(f"prepare: {len(files)} files in {len(groups)} groups -> {opts.output} (seq_len {opts.seq_len})")
    items = [{"group": i, "files": json.dumps(g)} for i, g in enumerate(groups)]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        GroupPacker, fn_constructor_args=(opts,), batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(cpus, len(items))),
        num_cpus=1,
    )
    rows = sorted(ds.take_all(), key=lambda r: (int(r["group"]), str(r["split"])))
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "eval"):
        sel = [r for r in rows if r["split"] == split]
        splits[split] = split_record(
            [{"path": str(r["path"]), "rows": int(r["rows"])} for r in sel if int(r["rows"]) > 0],
            tokens=sum(int(r["tokens"]) for r in sel), documents=sum(int(r["documents"]) for r in sel),
            dropped_tokens=sum(int(r["dropped"]) for r in sel))
    kept = "eval" if opts.eval_fraction >= 1 else "train"  # --eval-fraction 1: a source of held-out rows only
    if splits[kept]["rows"] == 0:
        raise DataError(f"--input {' '.join(opts.inputs)}: produced no full row of {opts.seq_len} tokens "
                        "(empty or too little text); add text or lower --seq-len")
    manifest = write_manifest(  # last: marks the dataset complete
        opts.output, seq_len=opts.seq_len, rows_per_row_group=opts.rows_per_row_group, tokenizer=tok_id,
        train=splits["train"], eval=splits["eval"], input_fingerprint=fingerprint, source_files=[u for u, _ in files],
        command=" ".join(["raycpt", "prepare", *sys.argv[2:]]) if sys.argv[1:2] == ["prepare"] else None,
        eval_only=opts.eval_fraction >= 1)
    log(f"prepare: {splits['train']['rows']} train rows, {splits['eval']['rows']} eval rows, "
        f"{manifest['tokens']:,} tokens from {manifest['documents']} documents")
    return manifest
