"""Random-token sources in the prepared-shard format, for benchmarks at realistic sizes.

Shards, row groups and manifest are exactly what `raycpt prepare` writes (same writer); only the
tokens are random and the tokenizer identity says `synthetic`, so `check_against_model` refuses
them for a real model's training job while the benchmarks read them like any source.
"""

from __future__ import annotations

import numpy as np

from raycpt import storage
from raycpt.data.manifest import MANIFEST_NAME, split_record, write_manifest
from raycpt.data.prepare import write_rows


def write_synthetic_source(uri: str, rows: int, seq_len: int, vocab_size: int, rows_per_file: int = 4096,
                           rows_per_row_group: int = 64, eval_rows: int = 0, seed: int = 0) -> str:
    """Write (once) a source of `rows` random rows; returns its URI. An existing one is kept."""
    if storage.exists(storage.join(uri, MANIFEST_NAME)):
        return uri
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", rows), ("eval", eval_rows)):
        files = []
        for i, start in enumerate(range(0, n, rows_per_file)):
            count = min(rows_per_file, n - start)
            rel = f"{split}/part-{i:05d}.parquet"
            write_rows(storage.join(uri, rel), rng.integers(0, vocab_size, (count, seq_len), dtype=np.int32),
                       seq_len, rows_per_row_group)
            files.append({"path": rel, "rows": count})
        splits[split] = split_record(files, tokens=n * seq_len, documents=n)
    write_manifest(uri, seq_len=seq_len, rows_per_row_group=rows_per_row_group,
                   tokenizer={"name": "synthetic", "vocab_size": vocab_size, "eos_token_id": None,
                              "vocab_fingerprint": f"synthetic-{vocab_size}"},
                   train=splits["train"], eval=splits["eval"], input_fingerprint=f"synthetic-{rows}x{seq_len}-{seed}")
    return uri
