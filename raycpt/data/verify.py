"""Shard checks that can run on the driver before any worker starts: every shard's Parquet footer
is read (a few KB each, in parallel) and must be readable, have the packed-row schema, the row
count the manifest records, and token ids below the model's vocab (from the row-group
statistics, so no data pages are read). Each problem names the file and the config key.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycpt import storage
from raycpt.data.manifest import Manifest, ShardFile


def shard_problems(m: Manifest, key: str, vocab_size: int, threads: int = 16) -> list[str]:
    files = list(m.train.files) + list(m.eval.files)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        found = pool.map(lambda f: _check_file(m, f, key, vocab_size), files)
    return [p for p in found if p]


def _check_file(m: Manifest, f: ShardFile, key: str, vocab_size: int) -> str | None:
    uri = m.file_uri(f)
    fs, path = storage.pyarrow_filesystem(uri)
    try:
        meta = storage.with_retries(lambda: pq.read_metadata(fs.open_input_file(path)), f"reading {uri}")
    except FileNotFoundError:
        return f"{key}: shard {uri} is missing; re-run prepare into a fresh folder"
    except Exception as e:  # noqa: BLE001 - whatever the reader says, name the file
        return f"{key}: shard {uri} is not readable Parquet ({type(e).__name__}: {str(e)[:160]}); re-run prepare"
    schema = meta.schema.to_arrow_schema()
    want = pa.list_(pa.int32(), m.seq_len)
    if schema.names != ["input_ids"] or schema.field(0).type != want:
        return (f"{key}: shard {uri} has schema {schema.to_string(show_schema_metadata=False)!r}, "
                f"not input_ids: {want}; it was not written by `raycpt prepare` for seq_len {m.seq_len}")
    if meta.num_rows != f.rows:
        return f"{key}: shard {uri} has {meta.num_rows} rows but the manifest says {f.rows}; re-run prepare"
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(0).statistics
        if stats is not None and stats.has_min_max and (stats.max >= vocab_size or stats.min < 0):
            bad = stats.max if stats.max >= vocab_size else stats.min
            return (f"{key}: shard {uri} row group {g} holds token id {bad}, outside the model's vocab "
                    f"(size {vocab_size}); the shards do not belong to this model")
    return None


def check_data_fits_model(job, manifests: list[Manifest], tokenizer_id: dict | None, vocab_size: int,
                          read_footers: bool) -> None:
    """Raise DataError listing every way the job's sources and probes (`eval.probes`) do not fit its
    model (seq_len, tokenizer, vocab; with `read_footers`, every shard's footer too)."""
    from raycpt.data.manifest import DataError, check_against_model, read_manifest

    problems = []
    keyed = [(f"data.sources[{i}].path", m) for i, m in enumerate(manifests)]
    keyed += [(f"eval.probes[{i}].path", read_manifest(p.path, f"eval.probes[{i}].path", for_training=False))
              for i, p in enumerate(job.eval.probes)]
    for key, m in keyed:
        problems += check_against_model(m, key, job.data.seq_len, tokenizer_id, vocab_size)
        if read_footers:
            problems += shard_problems(m, key, vocab_size)
    from raycpt.evals.tasks import task_problems

    problems += task_problems(job)
    if problems:
        raise DataError("the data does not fit the model:\n  " + "\n  ".join(problems))


def check_token_rows(rows: np.ndarray, uri: str, first_row: int, vocab_size: int, key: str = "data.sources") -> None:
    """Raise DataError naming the shard and row when a row holds a token id outside [0, vocab_size).

    `rows` are consecutive rows of the shard `uri` starting at row `first_row`. The reader calls this
    on every row group it decodes, and the driver on the eval rows: Parquet statistics (which the
    footer check reads) are optional, so a shard without them is only caught here."""
    from raycpt.data.manifest import DataError

    if not rows.size:
        return
    bad = (rows >= vocab_size) | (rows < 0)
    if not bad.any():
        return
    r, c = (int(x) for x in np.argwhere(bad)[0])
    raise DataError(f"{key}: shard {uri} row {first_row + r} holds token id {int(rows[r, c])} at position {c}, "
                    f"outside the model's vocab (size {vocab_size}); the shards do not belong to this model or "
                    "were damaged: re-run prepare with --tokenizer <model.base>")


def read_shard_rows(m: Manifest, f: ShardFile, max_rows: int) -> np.ndarray:
    """The first `max_rows` packed rows of one shard file of `m` (any reader error propagates)."""
    uri = m.file_uri(f)
    fs, path = storage.pyarrow_filesystem(uri)
    table = storage.with_retries(lambda: pq.read_table(path, filesystem=fs), f"reading {uri}")
    return table.column(0).combine_chunks().values.to_numpy().reshape(-1, m.seq_len)[:max_rows]


def eval_row_problems(m: Manifest, key: str, vocab_size: int, max_rows: int) -> list[str]:
    """The eval rows training will use (the first `max_rows` of the eval split), read and checked
    like training rows: readable, token ids inside the vocab. A few rows per source: cheap."""
    from raycpt.data.manifest import DataError

    problems, need = [], max_rows
    for f in m.eval.files:
        if need <= 0:
            break
        uri = m.file_uri(f)
        try:
            rows = read_shard_rows(m, f, need)
            check_token_rows(rows, uri, 0, vocab_size, key)
        except DataError as e:
            problems.append(str(e))
            continue
        except Exception as e:  # noqa: BLE001 - whatever the reader says, name the file
            problems.append(f"{key}: eval shard {uri} is not readable ({type(e).__name__}: {str(e)[:160]}); "
                            "re-run prepare")
            continue
        need -= len(rows)
    return problems
