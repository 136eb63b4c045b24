"""Storage by URI: a local path, file://, or s3:// (any S3-compatible endpoint).

Paths stay strings throughout (``pathlib.Path`` collapses ``s3://``). Credentials come from the
AWS environment/config chain that s3fs/botocore read; nothing here writes them anywhere.
Transient errors (throttling, resets, 5xx) are retried with exponential backoff.
"""

from __future__ import annotations

import json
import os
import random
import time
from functools import lru_cache
from typing import Any, Callable, TypeVar

import fsspec

from raycpt.errors import RaycptError

T = TypeVar("T")

# Set by `configure_storage` from `run.s3_endpoint_url`, or from the environment variable that
# tests and S3-compatible deployments use.
_S3_ENDPOINT_ENV = "RAYCPT_S3_ENDPOINT_URL"


class StorageError(RaycptError, RuntimeError):
    """Storage that cannot be reached or read; the message names the URI and the likely fix."""

    # An outage can end; a missing bucket or bad credentials are caught on the driver first.
    retry_in_workers = True


def configure_storage(s3_endpoint_url: str | None) -> None:
    """Point s3:// URIs at an S3-compatible endpoint for this process and the workers it starts."""
    if s3_endpoint_url:
        os.environ[_S3_ENDPOINT_ENV] = s3_endpoint_url
        _filesystem.cache_clear()


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


@lru_cache(maxsize=8)
def _filesystem(protocol: str, endpoint: str | None) -> fsspec.AbstractFileSystem:
    if protocol == "s3":
        kwargs: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "adaptive"}}}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        # Listing caches would hide checkpoints another worker just committed.
        return fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **kwargs)
    return fsspec.filesystem(protocol)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI."""
    if uri.startswith("s3://"):
        return _filesystem("s3", os.environ.get(_S3_ENDPOINT_ENV)), uri[len("s3://"):]
    if uri.startswith("file://"):
        return _filesystem("file", None), uri[len("file://"):]
    if "://" in uri:
        protocol = uri.split("://", 1)[0]
        return _filesystem(protocol, None), uri.split("://", 1)[1]
    return _filesystem("file", None), os.path.abspath(uri)


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem and path for a URI (used by Parquet readers and writers)."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        fs, path = filesystem(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), filesystem(uri)[1]


_TRANSIENT = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable",
              "Connection reset", "timed out", "503", "500", "502", "504")


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(t in text for t in _TRANSIENT)


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6, base_delay_s: float = 0.2) -> T:
    """Call fn, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not _is_transient(e):
                raise _explain(e, what) from e
            time.sleep(base_delay_s * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _explain(e: BaseException, what: str) -> BaseException:
    text = str(e)
    if isinstance(e, FileNotFoundError):
        return e
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{what}: the bucket does not exist; create it or fix run.storage / data.sources[*].path")
    denied = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoCredentials",
              "Unable to locate credentials")
    if any(k in text for k in denied):
        return StorageError(
            f"{what}: access denied or no credentials ({type(e).__name__}); set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance/service-account role"
        )
    if isinstance(e, (ConnectionError, OSError)) and ("connect" in text.lower() or "endpoint" in text.lower()):
        return StorageError(f"{what}: storage unreachable ({text[:200]}); check run.s3_endpoint_url and the network")
    return e


# The reachability probe answers in seconds or says why not: one attempt, short timeouts, and a
# deadline over the whole call (an endpoint that accepts connections and never answers would
# otherwise hold `raycpt train` through botocore's 60 s read timeout times every retry).
PROBE_CONNECT_TIMEOUT_S = 2.0
PROBE_READ_TIMEOUT_S = 3.0
PROBE_DEADLINE_S = 8.0


def _probe_filesystem(endpoint: str | None) -> fsspec.AbstractFileSystem:
    kwargs: dict[str, Any] = {"config_kwargs": {"connect_timeout": PROBE_CONNECT_TIMEOUT_S,
                                                "read_timeout": PROBE_READ_TIMEOUT_S,
                                                "retries": {"max_attempts": 1, "mode": "standard"}}}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    fs = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **kwargs)
    fs.retries = 1  # s3fs's own retry loop (5 attempts with backoff by default), on top of botocore's
    return fs


def check_reachable(uri: str, key: str) -> None:
    """Fail fast, naming the config key, when a URI's bucket is missing, its endpoint does not answer
    within a few seconds, or its credentials do not work (an S3 listing of a missing bucket looks
    like an empty folder, so ask for the bucket)."""
    if not uri.startswith("s3://"):
        return
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    endpoint = os.environ.get(_S3_ENDPOINT_ENV)
    bucket = uri[len("s3://"):].split("/", 1)[0]
    where = f"s3://{bucket} at {endpoint or 'AWS'}"
    fs = _probe_filesystem(endpoint)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raycpt-storage-probe")
    # A listing, not `exists`: s3fs answers `exists` with False for missing credentials too.
    probe = pool.submit(fs.ls, bucket, refresh=True)
    pool.shutdown(wait=False)  # a probe past its deadline is left to its own timeouts
    try:
        probe.result(timeout=PROBE_DEADLINE_S)
    except FutureTimeout:
        raise StorageError(
            f"{key}: checking that {where} answers: no answer within {PROBE_DEADLINE_S:.0f} s (connect timeout "
            f"{PROBE_CONNECT_TIMEOUT_S:.0f} s, read timeout {PROBE_READ_TIMEOUT_S:.0f} s); check run.s3_endpoint_url "
            "(or RAYCPT_S3_ENDPOINT_URL), the network and any proxy") from None
    except FileNotFoundError:
        raise StorageError(f"{key}: the bucket s3://{bucket} does not exist; create it or fix the URI") from None
    except Exception as e:  # noqa: BLE001 - name the key whatever the client raised
        explained = _explain(e, f"checking that {where} answers")
        if isinstance(explained, StorageError):
            raise StorageError(f"{key}: {explained}") from None
        raise StorageError(f"{key}: checking that {where} answers: {type(e).__name__}: {str(e)[:200]}; check "
                           "run.s3_endpoint_url (or RAYCPT_S3_ENDPOINT_URL) and the network") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), f"checking {uri}")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), f"reading {uri}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object whole. Local files go through a temp file + rename so readers never see
    half a file; an S3 PUT is atomic by itself."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), f"writing {uri}")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True).encode())


def list_dir(uri: str) -> list[str]:
    """Names (not paths) directly under a folder/prefix; [] when it does not exist."""
    fs, path = filesystem(uri)

    def _ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False, refresh=True) if is_remote(uri) else fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    return with_retries(_ls, f"listing {uri}")


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)

    def _rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    with_retries(_rm, f"deleting {uri}")


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(filesystem(uri)[1], exist_ok=True)


def local_path(uri: str) -> str | None:
    """The local filesystem path of a URI, or None for object storage."""
    return None if is_remote(uri) else filesystem(uri)[1]
