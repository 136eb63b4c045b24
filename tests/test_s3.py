"""Object storage end to end: a loopback S3 server (moto) reached over HTTP through s3fs/pyarrow.

prepare from s3:// to s3://, training whose shards, checkpoints and Ray Train record all live
in the bucket (and resume from there), a store that throws throttling errors at every few
requests, and the errors a user sees for a missing bucket or missing credentials.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import STDLIB, sample_log, tiny_job_tree, upload_folder, write_english_jsonl
from raycpt import storage
from raycpt.checkpoint.layout import latest_committed, list_checkpoints
from raycpt.config import parse_job
from raycpt.data.manifest import DataError, read_manifest
from raycpt.data.plan import worker_slice
from raycpt.data.prepare import PrepareOptions, prepare
from raycpt.data.stream import build_plan, make_spec, read_manifests
from raycpt.launch import preflight, train
from raycpt.storage import StorageError

pytestmark = pytest.mark.slow


def _shard_rows(manifest_uri: str) -> np.ndarray:
    m = read_manifest(manifest_uri)
    parts = []
    for f in m.train.files:
        fs, path = storage.pyarrow_filesystem(m.file_uri(f))
        parts.append(pq.read_table(path, filesystem=fs).column(0).combine_chunks().values.to_numpy())
    return np.concatenate(parts)


def test_prepare_from_s3_to_s3_writes_the_same_tokens_as_a_local_prepare(s3_endpoint, tokenizer_dir, ray_local,
                                                                          tmp_path):
    raw = tmp_path / "raw"
    write_english_jsonl(raw / "topics.jsonl", limit=20)
    (raw / "code").mkdir()
    for name in ("__init__.py", "decoder.py", "encoder.py"):
        (raw / "code" / name).write_text(open(os.path.join(STDLIB, "json", name)).read())
    upload_folder(str(raw), "s3://raycpt-test/raw")

    def opts(inputs: tuple[str, ...], output: str) -> PrepareOptions:
        return PrepareOptions(inputs=inputs, tokenizer_dir=tokenizer_dir, seq_len=64, output=output,
                              eval_fraction=0.1, group_bytes=16 << 10, rows_per_row_group=16,
                              s3_endpoint_url=s3_endpoint)

    remote = prepare(opts(("s3://raycpt-test/raw/topics.jsonl", "s3://raycpt-test/raw/code/*.py"),
                          "s3://raycpt-test/shards/mixed"), log=lambda m: None)
    local = prepare(opts((str(raw / "topics.jsonl"), str(raw / "code" / "*.py")), str(tmp_path / "mixed")),
                    log=lambda m: None)
    assert remote["splits"] == local["splits"] and remote["input_fingerprint"] == local["input_fingerprint"]
    assert np.array_equal(_shard_rows("s3://raycpt-test/shards/mixed"), _shard_rows(str(tmp_path / "mixed")))
    # Same input again: nothing to do; a different input into the same prefix: refused.
    assert prepare(opts(("s3://raycpt-test/raw/topics.jsonl", "s3://raycpt-test/raw/code/*.py"),
                        "s3://raycpt-test/shards/mixed"), log=lambda m: None) == remote
    with pytest.raises(DataError, match="holds a different dataset"):
        prepare(opts(("s3://raycpt-test/raw/topics.jsonl",), "s3://raycpt-test/shards/mixed"), log=lambda m: None)


@pytest.fixture(scope="module")
def s3_sources(s3_endpoint, prepared_sources) -> dict[str, str]:
    return {name: upload_folder(local, f"s3://raycpt-test/sources/{name}") for name, local in prepared_sources.items()}


def _expected_ids(tree: dict, steps: int) -> dict[int, list[int]]:
    """The global sample ids of each step, straight from the pure blend plan."""
    job = parse_job(tree)
    plan = build_plan(make_spec(job, read_manifests(job), None, rank=0, world_size=1, vocab_size=1 << 20))
    return {s: worker_slice(plan.next_batch(), 0, 1).tolist() for s in range(steps)}


def test_training_reads_shards_and_keeps_checkpoints_in_s3_and_resumes_through_a_throttled_store(
        s3_endpoint, s3_sources, tiny_model, ray_local):
    tree = tiny_job_tree("s3://raycpt-test/runs", tiny_model, s3_sources,
                         run={"name": "on-s3", "s3_endpoint_url": s3_endpoint},
                         train={"max_steps": 4, "log_sample_ids": True})
    assert train(parse_job(tree)).error is None
    run_uri = parse_job(tree).run_uri
    assert run_uri.startswith("s3://") and latest_committed(run_uri).step == 4

    # A second submission of the same run with a longer budget resumes from the bucket, through a
    # store that answers every 7th request with 503 SlowDown: every read and write is retried.
    proxy = _ThrottlingProxy(s3_endpoint, every=7)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        longer = {**tree, "run": {**tree["run"], "s3_endpoint_url": proxy.endpoint},
                  "train": {**tree["train"], "max_steps": 6}}
        assert preflight(parse_job(longer)).startswith("resuming step 4")
        result = train(parse_job(longer))
        assert result.error is None, result.error
        assert proxy.injected >= 10, f"only {proxy.injected} errors injected over {proxy.count} requests"
    finally:
        proxy.shutdown()
        storage.configure_storage(s3_endpoint)
    state = storage.read_json(storage.join(latest_committed(run_uri).uri, "train_state.json"))
    assert state["step"] == 6
    assert sample_log(run_uri) == _expected_ids(longer, 6)
    assert all(e.committed for e in list_checkpoints(run_uri))
    # No credentials are ever written next to the checkpoints.
    text = storage.read_bytes(storage.join(latest_committed(run_uri).uri, "train_state.json")).decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text


class _ThrottlingProxy(ThreadingHTTPServer):
    """HTTP proxy in front of the S3 server that answers every `every`-th request with
    503 SlowDown, the error S3 sends when a prefix is throttled."""

    def __init__(self, upstream: str, every: int):
        self.upstream = upstream.split("://", 1)[1]
        self.every = every
        self.count = 0
        self.injected = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        server: _ThrottlingProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with server.lock:
            server.count += 1
            fail = server.count % server.every == 0
            server.injected += fail
        if fail:
            msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(k, v)
        # A HEAD answer has no body but must carry the object's length.
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


def test_missing_bucket_is_named_before_any_worker_starts(s3_endpoint, s3_sources, tiny_model):
    good = tiny_job_tree("s3://raycpt-test/runs", tiny_model, s3_sources,
                         run={"name": "x", "s3_endpoint_url": s3_endpoint})
    bad_data = {**good, "data": {**good["data"], "sources": [
        {**good["data"]["sources"][0], "path": "s3://no-such-bucket/code"}, good["data"]["sources"][1]]}}
    with pytest.raises((DataError, StorageError), match=r"data\.sources\[0\]\.path.*bucket"):
        preflight(parse_job(bad_data))
    bad_storage = {**good, "run": {**good["run"], "storage": "s3://no-such-bucket/runs"}}
    with pytest.raises(StorageError, match=r"run\.storage.*bucket"):
        preflight(parse_job(bad_storage))


def test_missing_credentials_fail_fast_with_the_fix(s3_endpoint, s3_sources, tiny_model, tmp_path):
    tree = tiny_job_tree("s3://raycpt-test/runs", tiny_model, s3_sources,
                         run={"name": "nocreds", "s3_endpoint_url": s3_endpoint})
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    out = subprocess.run([sys.executable, "-m", "raycpt.cli", "train", str(job_yaml)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "credentials" in out.stderr and "AWS_ACCESS_KEY_ID" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, "a configuration error should not print a traceback"
