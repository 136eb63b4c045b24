"""The manifest of a prepared token source, and the checks that tie it to a model.

A source folder holds ``train/part-*.parquet``, optionally ``eval/part-*.parquet``, and
``manifest.json``, which `raycpt prepare` writes last: a folder without it is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from raycpt import storage
from raycpt.errors import RaycptError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class DataError(RaycptError, ValueError):
    """Bad or mismatched training data; the message names the file or config key."""


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the source folder
    rows: int


@dataclass(frozen=True)
class Split:
    files: tuple[ShardFile, ...]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class Manifest:
    uri: str  # the source folder
    seq_len: int
    rows_per_row_group: int
    tokenizer: dict[str, Any]
    train: Split
    eval: Split
    raw: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    @property
    def fingerprint(self) -> str:
        """Identity of the data (not of where it lives): changes when the shards change."""
        d = {k: self.raw[k] for k in ("seq_len", "tokenizer", "splits", "input_fingerprint")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def file_uri(self, shard: ShardFile) -> str:
        return storage.join(self.uri, shard.path)


def tokenizer_identity(tokenizer: Any, name: str) -> dict[str, Any]:
    """What identifies a tokenizer for the purpose of matching shards to a model."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {
        "name": name,
        "vocab_size": int(max(len(tokenizer), max(vocab.values()) + 1)),
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_fingerprint": digest,
    }


def split_record(files: list[dict[str, Any]], tokens: int, documents: int, dropped_tokens: int = 0) -> dict[str, Any]:
    """One split (`train` or `eval`) of a manifest: its shard files ({path, rows}) and totals."""
    return {"files": files, "rows": sum(int(f["rows"]) for f in files), "tokens": tokens, "documents": documents,
            "dropped_tokens": dropped_tokens}


def write_manifest(uri: str, *, seq_len: int, rows_per_row_group: int, tokenizer: dict[str, Any],
                   train: dict[str, Any], eval: dict[str, Any], input_fingerprint: str,
                   source_files: list[str] | None = None, command: str | None = None,
                   eval_only: bool = False) -> dict[str, Any]:
    """Write a source's manifest (call it last: its presence marks the source complete); returns it.
    `train`/`eval` come from `split_record`; `source_files` are the input files it was made from;
    `eval_only`: every row is held out (a probe set, never trained on)."""
    files = source_files or []
    manifest = {
        "format_version": FORMAT_VERSION, "seq_len": seq_len, "rows_per_row_group": rows_per_row_group,
        "tokenizer": tokenizer, "splits": {"train": train, "eval": eval},
        "documents": train["documents"] + eval["documents"], "tokens": train["tokens"] + eval["tokens"],
        "source_files": len(files), "source_files_sample": files[:20], "input_fingerprint": input_fingerprint,
        "eval_only": eval_only, "command": command,
    }
    storage.write_json(storage.join(uri, MANIFEST_NAME), manifest)
    return manifest


def _split(raw: dict[str, Any], name: str) -> Split:
    files = raw.get("splits", {}).get(name, {}).get("files", [])
    return Split(tuple(ShardFile(f["path"], int(f["rows"])) for f in files))


_REQUIRED_FIELDS = ("seq_len", "rows_per_row_group", "tokenizer", "splits", "input_fingerprint")


def check_source_path(uri: str, key: str) -> None:
    """A local source path must be a folder: say so when it is missing, or a file (manifest.json itself)."""
    path = storage.local_path(uri)
    if path is None:
        return  # object storage: a prefix is not a folder; a missing manifest says enough
    import os

    if not os.path.exists(path):
        raise DataError(f"{key}: {uri} does not exist; check the path, or run `raycpt prepare --output {uri}`")
    if os.path.isfile(path):
        if os.path.basename(path) == MANIFEST_NAME:
            raise DataError(f"{key}: {uri} is the manifest itself; give the folder that holds it "
                            f"({os.path.dirname(path)})")
        raise DataError(f"{key}: {uri} is a file; give a folder written by `raycpt prepare` (it holds {MANIFEST_NAME})")


def read_manifest(uri: str, key: str = "data.sources[*].path", for_training: bool = True) -> Manifest:
    """Read and check a source's manifest; errors name the folder and the config key.

    `for_training=False` (probes, `raycpt eval`): held-out rows are enough."""
    check_source_path(uri, key)
    muri = storage.join(uri, MANIFEST_NAME)
    try:
        raw = storage.read_json(muri)
    except FileNotFoundError:
        raise DataError(
            f"{key}: {uri} has no {MANIFEST_NAME}; it is not a prepared source (run `raycpt prepare`, "
            "or an earlier prepare was interrupted: run it again)"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{muri}: not valid JSON ({e}); re-run `raycpt prepare`") from None
    except UnicodeDecodeError:
        raise DataError(f"{key}: {muri} is not text; re-run `raycpt prepare`") from None
    if not isinstance(raw, dict):
        raise DataError(f"{key}: {muri} is not a manifest (a JSON object); re-run `raycpt prepare`")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{muri}: format_version {raw.get('format_version')} is not {FORMAT_VERSION}; re-prepare it")
    missing = [k for k in _REQUIRED_FIELDS if k not in raw]
    if missing:
        raise DataError(f"{key}: {muri} lacks {', '.join(missing)}; it was not written by `raycpt prepare` "
                        "(or was edited): re-run prepare")
    try:
        m = Manifest(
            uri=uri.rstrip("/"),
            seq_len=int(raw["seq_len"]),
            rows_per_row_group=int(raw["rows_per_row_group"]),
            tokenizer=raw["tokenizer"],
            train=_split(raw, "train"),
            eval=_split(raw, "eval"),
            raw=raw,
        )
        m.vocab_size  # noqa: B018 - must parse here, not in the middle of training
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{key}: {muri} has a malformed field ({type(e).__name__}: {e}); "
                        "re-run `raycpt prepare`") from None
    if for_training and m.train.rows == 0 and m.eval.rows > 0:
        raise DataError(f"{key}: {uri} has no training rows, it holds only held-out rows (an eval-only source, "
                        "prepared with --eval-fraction 1); list it under eval.probes instead, or re-prepare it "
                        "with --eval-fraction below 1")
    if m.train.rows + (0 if for_training else m.eval.rows) == 0:
        raise DataError(f"{key}: {uri} has no {'training ' if for_training else ''}rows (empty source); "
                        "add text or drop the source")
    return m


def check_against_model(m: Manifest, key: str, seq_len: int, tokenizer_id: dict[str, Any] | None,
                        model_vocab_size: int) -> list[str]:
    """Problems that make these shards unusable for this job's model; [] when they fit."""
    problems = []
    if m.seq_len != seq_len:
        problems.append(f"{key}: shards have seq_len {m.seq_len} but data.seq_len is {seq_len}; "
                        "set data.seq_len to match or re-prepare with --seq-len")
    if m.vocab_size > model_vocab_size:
        problems.append(f"{key}: tokenizer vocab {m.vocab_size} exceeds the model's {model_vocab_size}")
    if tokenizer_id is not None and m.tokenizer.get("vocab_fingerprint") != tokenizer_id["vocab_fingerprint"]:
        problems.append(
            f"{key}: shards were tokenized with {m.tokenizer.get('name')!r} "
            f"(vocab {m.tokenizer.get('vocab_fingerprint')}), which differs from the model's tokenizer "
            f"(vocab {tokenizer_id['vocab_fingerprint']}); re-prepare with --tokenizer <model.base>"
        )
    return problems
