"""DCP's `.metadata`, read without running code from the checkpoint.

torch.distributed.checkpoint writes `.metadata` with pickle and reads it back with plain
`pickle.load`, so a crafted checkpoint (another team's bucket, a run folder someone can write to)
runs code on `raycpt export`, a resume or `model.init.run`. raycpt reads it with an unpickler that
admits only the classes DCP's metadata is made of — found by unpickling the metadata of real
checkpoints (full and LoRA runs, sync and async saves, local and s3://) — and refuses any other
name, naming the file. The readers below are DCP's own, with only `read_metadata` replaced; every
raycpt load path builds its reader here.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from raycpt.errors import RaycptError

METADATA_NAME = ".metadata"


class CheckpointError(RaycptError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose metadata asks to import something DCP's metadata never holds."""


_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# Exact (module, name) pairs besides the classes of torch.distributed.checkpoint.metadata.
_ALLOWED = {
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each chunk lies in which file
    ("torch.serialization", "_get_layout"),  # layout by name from torch's own table (torch.strided ...)
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),  # checkpoint_id
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch.Size, torch dtypes and plain containers; nothing else."""

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == _DCP_METADATA_MODULE:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == _DCP_METADATA_MODULE:
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused to load: it asks to import {module}.{name}, which DCP checkpoint "
            "metadata never holds (a crafted or foreign file could run code this way); do not use this "
            "checkpoint, or re-save it with raycpt"
        )


def load_metadata_bytes(data: bytes, source: str) -> Metadata:
    """Unpickle `.metadata` bytes with the restricted unpickler; errors name `source`."""
    try:
        meta = RestrictedUnpickler(data, source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or garbled file: say which
        raise CheckpointError(f"{source}: unreadable DCP metadata ({type(e).__name__}: {str(e)[:160]}); the save "
                              "was damaged after it committed") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{source}: holds a {type(meta).__name__}, not DCP checkpoint metadata")
    return meta


def read_metadata(checkpoint_uri: str) -> Metadata:
    """The metadata of a checkpoint folder (local or s3://), read safely."""
    from raycpt import storage

    uri = storage.join(checkpoint_uri, METADATA_NAME)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: missing; the checkpoint is incomplete") from None
    return load_metadata_bytes(data, uri)


class _SafeMetadata:
    """Mixin for DCP's readers: `read_metadata` through the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        path = self.fs.concat_path(self.path, name)
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        meta = load_metadata_bytes(data, str(path))
        # As DCP's own read_metadata does: the load id lets DCP tell loads apart.
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP's local reader, metadata read safely."""


def safe_reader(uri: str, endpoint_url: str | None = None):
    """The DCP storage reader for a checkpoint folder: local, or fsspec (s3://) with `endpoint_url`."""
    from raycpt import storage

    if storage.is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        class SafeFsspecReader(_SafeMetadata, FsspecReader):
            pass

        kwargs = {"endpoint_url": endpoint_url} if endpoint_url and uri.startswith("s3://") else {}
        return SafeFsspecReader(uri, **kwargs)
    return SafeFileSystemReader(storage.local_path(uri))
