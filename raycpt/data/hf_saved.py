"""Hugging Face `datasets` folders written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
read with pyarrow alone (the `datasets` package is not needed to prepare them).

The layout (datasets 2.x-5.x):

    <folder>/state.json            {"_data_files": [{"filename": "data-00000-of-00002.arrow"}, ...], ...}
    <folder>/dataset_info.json     features, description, ...
    <folder>/data-0000i-of-0000n.arrow   Arrow IPC *stream* files, one record batch after another
  or, for a DatasetDict:
    <folder>/dataset_dict.json     {"splits": ["train", "test"]}
    <folder>/<split>/...           one Dataset folder as above per split

A folder given to `raycpt prepare --input` that is such a dataset contributes its .arrow files in
the order state.json lists them (every split of a DatasetDict, in dataset_dict.json's order; give
`<folder>/train` for one split); its JSON metadata files are not documents.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa

from raycpt import storage
from raycpt.data.manifest import DataError

ARROW_SUFFIX = ".arrow"
STATE = "state.json"
DATASET_DICT = "dataset_dict.json"
METADATA_FILES = (STATE, "dataset_info.json", DATASET_DICT)


def saved_dataset_files(fs: Any, path: str) -> list[str] | None:
    """The .arrow files of a save_to_disk folder at `path` (fsspec filesystem), in the dataset's
    order; None when `path` is not one."""
    if fs.exists(posixpath.join(path, DATASET_DICT)):
        with fs.open(posixpath.join(path, DATASET_DICT), "rb") as f:
            splits = json.load(f).get("splits", [])
        files: list[str] = []
        for split in splits:
            files.extend(saved_dataset_files(fs, posixpath.join(path, split)) or [])
        return files
    state = posixpath.join(path, STATE)
    if not fs.exists(state):
        return None
    with fs.open(state, "rb") as f:
        data_files = json.load(f).get("_data_files")
    if not isinstance(data_files, list):
        return None  # some other program's state.json
    return [posixpath.join(path, d["filename"]) for d in data_files]


def is_saved_dataset_metadata(path: str, siblings: set[str]) -> bool:
    """A state.json / dataset_info.json / dataset_dict.json beside .arrow files (or split folders)."""
    name = posixpath.basename(path)
    return name in METADATA_FILES and (name == DATASET_DICT or posixpath.join(posixpath.dirname(path), STATE)
                                       in siblings)


def _open_batches(uri: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch], Any]:
    """(schema, batches, open file) of an Arrow IPC file: the stream format save_to_disk writes,
    or the random-access file format."""
    fs, path = storage.filesystem(uri)
    f = fs.open(path, "rb")
    try:
        reader = pa.ipc.open_stream(f)
        return reader.schema, iter(reader), f
    except pa.ArrowInvalid:
        f.seek(0)
        file_reader = pa.ipc.open_file(f)
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        return file_reader.schema, batches, f


def _check_text_column(uri: str, schema: pa.Schema, text_column: str) -> None:
    if text_column not in schema.names:
        raise DataError(f"{uri}: no column {text_column!r}; its columns are {schema.names}; "
                        f"pass --text-column with one of them")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{uri}: column {text_column!r} holds {kind}, not text; pass --text-column with a text column "
                        f"(columns: {schema.names})")


def check_arrow_text_column(uri: str, text_column: str) -> None:
    """Fail before any work starts when an .arrow input lacks the text column (reads the schema only)."""
    try:
        schema, _, f = _open_batches(uri)
        f.close()
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{uri}: not a readable Arrow file ({type(e).__name__}: {e})") from None
    _check_text_column(uri, schema, text_column)


def iter_arrow_documents(uri: str, text_column: str) -> Iterator[str]:
    """The non-empty texts of one .arrow file's column, a record batch at a time (bounded memory)."""
    schema, batches, f = _open_batches(uri)
    try:
        _check_text_column(uri, schema, text_column)
        for batch in batches:
            for text in batch.column(schema.get_field_index(text_column)).to_pylist():
                if text:
                    yield text
    finally:
        f.close()
