"""Bad input, through the real CLI in a subprocess: every case ends in exit 2 with one paragraph that
names the key or file (and no traceback); checks the driver can make fail before Ray starts.

Most cases never start Ray. The cases that need a model, shards or a checkpoint share the session
fixtures of conftest.py (one tiny model, two prepared sources, one trained run).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Driver-side checks fail in 0.3-4 s on an idle machine; generous for a loaded 2-core CI machine. The
# sharper proof of "before Ray starts" is that no Ray session appears in the command's Ray folder.
EARLY_S = 60


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    new_ray_sessions: set[str]


def raycpt(*args: str, timeout_s: float = 120, env: dict[str, str] | None = None) -> Outcome:
    """Run `python -m raycpt.cli ARGS` as a user would; note any Ray session it started (in a Ray
    temp folder of its own: other Ray instances on the machine do not count)."""
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths have a length limit
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "raycpt.cli", *args], capture_output=True, text=True,
                           timeout=timeout_s, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
                                **(env or {})})
        sessions = set(glob.glob(os.path.join(ray_tmp, "ray", "session_*"))
                       + glob.glob(os.path.join(ray_tmp, "session_*")))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return Outcome(p.returncode, p.stdout, p.stderr, time.monotonic() - t0, sessions)


def assert_clean(out: Outcome, *named: str, before_ray_s: float | None = None) -> None:
    """Exit 2, one paragraph on stderr naming every string in `named`, no traceback; with
    `before_ray_s`, failed within that many seconds and started no Ray."""
    text = out.stderr
    assert out.rc == 2, f"exit {out.rc}\n{text[-3000:]}"
    assert "Traceback" not in text and "Traceback" not in out.stdout, text[-3000:]
    for s in named:
        assert s in text, f"{s!r} not named in:\n{text[-3000:]}"
    if before_ray_s is not None:
        assert out.seconds < before_ray_s, f"took {out.seconds:.1f}s"
        assert not out.new_ray_sessions, f"started Ray: {out.new_ray_sessions}"


def write_yaml(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


# ---- config files and overrides: `raycpt schedule` loads a job exactly as train does, Ray-free ----

def config_only_job(tmp_path: Path) -> str:
    return write_yaml(tmp_path / "job.yaml", {
        "run": {"name": "r1", "storage": str(tmp_path / "runs")}, "model": {"base": str(tmp_path / "base")},
        "data": {"seq_len": 16, "sources": [{"name": "a", "path": str(tmp_path / "a"), "weight": 1}]},
        "train": {"global_batch_size": 8, "max_steps": 10}, "optim": {"peak_lr": 1e-4},
        "checkpoint": {"interval_steps": 5}})


@pytest.mark.parametrize("override, named", [
    ("train.max_steps=[6", ["train.max_steps=[6", "not valid YAML"]),
    ("train.max_steps.x=1", ["train.max_steps.x", "not a section"]),
    ("data.seq_len[0]=4", ["data.seq_len[0]", "not a list"]),
    ("train.max_steps", ["train.max_steps", "key=value"]),
])
def test_bad_override_is_named(tmp_path, override, named):
    assert_clean(raycpt("schedule", config_only_job(tmp_path), override), *named, before_ray_s=EARLY_S)


def test_duplicate_yaml_key_is_refused_naming_the_lines(tmp_path):
    job = Path(config_only_job(tmp_path))
    job.write_text(job.read_text() + "train:\n  max_steps: 3\n  global_batch_size: 8\n")
    out = raycpt("schedule", str(job))
    assert_clean(out, str(job), "'train' appears twice", "line", before_ray_s=EARLY_S)


@pytest.mark.parametrize("make, named", [
    (lambda d: str(d), ["folder"]),
    (lambda d: str(d / "nope.yaml"), ["nope.yaml", "no such job YAML"]),
    (lambda d: shutil.copy(sys.executable, d / "python.yaml"), ["python.yaml", "not a text file"]),
    (lambda d: (d / "broken.yaml").write_text("run: {name: [\n") and str(d / "broken.yaml"),
     ["broken.yaml", "not valid YAML", "line 2"]),
])
@pytest.mark.parametrize("command", ["train", "status"])
def test_job_path_that_is_no_job_yaml(tmp_path, make, named, command):
    path = str(make(tmp_path))
    assert_clean(raycpt(command, path), path, *named, before_ray_s=EARLY_S)


def test_status_of_a_missing_run_folder_says_so(tmp_path):
    assert_clean(raycpt("status", str(tmp_path / "no-such-run")), "no-such-run", "no such run folder",
                 before_ray_s=EARLY_S)


# ---- other commands' arguments --------------------------------------------------------------

def test_export_onto_a_file(tmp_path):
    (tmp_path / "out.txt").write_text("x")
    assert_clean(raycpt("export", str(tmp_path), "--output", str(tmp_path / "out.txt")), "--output", "out.txt",
                 before_ray_s=EARLY_S)


def test_bench_checkpoint_unknown_shape(tmp_path):
    assert_clean(raycpt("bench", "checkpoint", "--shape", "llama-70x", "--storage", str(tmp_path)), "--shape",
                 "llama-70x", "smollm2-135m", before_ray_s=EARLY_S)


def _truncated_gguf(d: Path) -> str:
    from conftest import smollm2_dir

    src = sorted(glob.glob(os.path.join(smollm2_dir(), "*.gguf")))[0]
    with open(src, "rb") as f:
        (d / "cut.gguf").write_bytes(f.read(2 << 20))
    return str(d / "cut.gguf")


@pytest.mark.parametrize("make, named", [
    (lambda d: str(d / "missing.gguf"), ["missing.gguf", "no such file"]),
    (lambda d: (d / "notes.gguf").write_text("hello") and str(d / "notes.gguf"), ["notes.gguf", "not a GGUF"]),
    (_truncated_gguf, ["cut.gguf", "truncated"]),
])
def test_import_of_no_gguf(tmp_path, make, named):
    out = raycpt("import", make(tmp_path), "--output", str(tmp_path / "hf"))
    assert_clean(out, *named, before_ray_s=EARLY_S)
    assert not (tmp_path / "hf" / "config.json").exists()


def test_debug_shows_the_traceback(tmp_path):
    out = raycpt("--debug", "schedule", config_only_job(tmp_path), "train.max_steps=[6")
    assert out.rc == 1 and "Traceback" in out.stderr and "ConfigError" in out.stderr


# ---- train: model folder, sources, checkpoints — found by the driver before Ray starts ------------

@pytest.fixture(scope="session")
def good_job(tmp_path_factory, tiny_model, prepared_sources) -> dict:
    """A job tree that trains (the tiny model on the two prepared sources); cases break one part."""
    from conftest import tiny_job_tree

    return tiny_job_tree(str(tmp_path_factory.mktemp("bad-input-runs")), tiny_model, prepared_sources,
                         run={"name": "bad-input"})


def job_with(tmp_path: Path, tree: dict, replace: dict[str, object]) -> str:
    """`tree` with dotted keys replaced ({"data.sources[0].path": ...}), as a YAML file."""
    from raycpt.config import apply_overrides

    items = [f"{k}={json.dumps(v)}" for k, v in replace.items()]
    return write_yaml(tmp_path / "job.yaml", apply_overrides(tree, items))


def model_copy(tmp_path: Path, tiny_model: str, drop: tuple[str, ...] = (), **write: str) -> str:
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    for pattern in drop:
        for f in out.glob(pattern):
            f.unlink()
    for name, text in write.items():  # config_json= writes config.json
        (out / name.replace("_", ".")).write_text(text)
    return str(out)


@pytest.mark.parametrize("make, named", [
    (lambda d, m: str(d / "no-such-model"), ["model.base", "no-such-model", "does not exist"]),
    (lambda d, m: model_copy(d, m, drop=("*.safetensors",)), ["model.base", "no *.safetensors"]),
    (lambda d, m: model_copy(d, m, config_json='{"model_type": "llama", '), ["model.base", "config.json",
                                                                            "not valid JSON"]),
    (lambda d, m: model_copy(d, m, drop=("tokenizer*",)), ["model.base", "no tokenizer files"]),
    (lambda d, m: Path(model_copy(d, m)).joinpath("model.safetensors").write_bytes(b"\x10\x00") and
     str(d / "model"), ["model.safetensors", "not a readable safetensors"]),
])
def test_bad_model_folder(tmp_path, good_job, tiny_model, make, named):
    job = job_with(tmp_path, good_job, {"model.base": make(tmp_path, tiny_model)})
    assert_clean(raycpt("train", job), *named, before_ray_s=EARLY_S)


def source_copy(tmp_path: Path, src: str, edit=None) -> str:
    out = tmp_path / "source"
    shutil.copytree(src, out)
    if edit is not None:
        edit(out)
    return str(out)


def _drop_manifest_key(key: str):
    def edit(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        del m[key]
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("make, named", [
    (lambda d, s: str(d / "no-such-source"), ["data.sources[0].path", "no-such-source", "does not exist"]),
    (lambda d, s: source_copy(d, s) + "/manifest.json", ["data.sources[0].path", "the manifest itself"]),
    (lambda d, s: source_copy(d, s) + "/train/part-00000.parquet", ["data.sources[0].path", "is a file"]),
    (lambda d, s: source_copy(d, s, _drop_manifest_key("seq_len")), ["data.sources[0].path", "lacks seq_len"]),
    (lambda d, s: str(Path(source_copy(d, s, lambda f: (f / "manifest.json").unlink()))),
     ["data.sources[0].path", "has no manifest.json"]),
])
def test_bad_source_path(tmp_path, good_job, prepared_sources, make, named):
    job = job_with(tmp_path, good_job, {"data.sources[0].path": make(tmp_path, prepared_sources["code"])})
    assert_clean(raycpt("train", job), *named, before_ray_s=EARLY_S)


def test_out_of_vocab_eval_row_without_statistics_is_found_by_the_driver(tmp_path, good_job, prepared_sources):
    import pyarrow.parquet as pq

    from raycpt.data.prepare import write_rows

    def poison_eval(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        rel = m["splits"]["eval"]["files"][0]["path"]
        rows = pq.read_table(folder / rel).column(0).combine_chunks().values.to_numpy().reshape(-1, 64).copy()
        rows[1, 5] = 10**6
        write_rows(str(folder / rel), rows, 64, 16)
        # As some writers do: no row-group statistics, so the footer check cannot see it.
        pq.write_table(pq.read_table(folder / rel), folder / rel, write_statistics=False, row_group_size=16)
        assert pq.read_metadata(folder / rel).row_group(0).column(0).statistics is None

    src = source_copy(tmp_path, prepared_sources["english"], poison_eval)
    job = job_with(tmp_path, good_job, {"data.sources[1].path": src})
    assert_clean(raycpt("train", job), "data.sources[1].path", "eval", "row 1", "1000000", before_ray_s=EARLY_S)


# ---- checkpoints: a copy of the session's trained run, damaged one way per case ----------------

def tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tmp_path, straight_run) -> tuple[dict, Path]:
    """(job tree, run folder) of a private copy of the straight run (committed steps 6 and 8)."""
    tree, run_uri = straight_run
    store = tmp_path / "store"
    shutil.copytree(run_uri, store / tree["run"]["name"])
    tree = json.loads(json.dumps(tree))
    tree["run"]["storage"] = str(store)
    return tree, store / tree["run"]["name"]


def committed_steps(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").iterdir() if (p / "COMMITTED").exists())


class WritesAFile:
    """Unpickling this runs os.system: what a crafted checkpoint would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_crafted_checkpoint_metadata_runs_no_code(tmp_path, run_copy):
    import pickle

    tree, run = run_copy
    newest = committed_steps(run)[-1]
    pwned = tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(WritesAFile(pwned)))
    before = tree_digest(run)
    out = raycpt("export", str(run), "--output", str(tmp_path / "hf"))
    assert_clean(out, str(newest / ".metadata"), "refused", "posix.system", before_ray_s=EARLY_S)
    out = raycpt("train", write_yaml(tmp_path / "job.yaml", tree))
    assert_clean(out, str(newest / ".metadata"), "refused", before_ray_s=EARLY_S)
    assert not pwned.exists()
    assert tree_digest(run) == before


def test_restricted_unpickler_admits_real_metadata(straight_run):
    from raycpt.checkpoint.metadata import read_metadata

    _, run_uri = straight_run
    for step in committed_steps(Path(run_uri)):
        meta = read_metadata(str(step))
        assert meta.state_dict_metadata and meta.storage_data


def test_truncated_train_state_is_named_by_train_and_status(tmp_path, run_copy):
    tree, run = run_copy
    for step in committed_steps(run):
        state = step / "train_state.json"
        state.write_text(state.read_text()[:100])
    before = tree_digest(run)
    assert_clean(raycpt("train", write_yaml(tmp_path / "job.yaml", tree)), "train_state.json", "not valid JSON",
                 "no committed checkpoint can be loaded", before_ray_s=EARLY_S)
    newest = committed_steps(run)[-1]
    assert_clean(raycpt("status", str(run)), str(newest / "train_state.json"), "not valid JSON", before_ray_s=EARLY_S)
    assert tree_digest(run) == before


def test_truncated_shard_falls_back_to_the_previous_checkpoint_and_says_so(run_copy, capsys):
    from raycpt.config import parse_job
    from raycpt.preflight import check_job

    tree, run = run_copy
    older, newest = committed_steps(run)[-2:]
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = tree_digest(run)
    message = check_job(parse_job(tree), joins_cluster=False)
    assert message.startswith(f"resuming step {int(older.name[5:])} ")
    said = [line for line in capsys.readouterr().out.splitlines() if "falling back" in line]
    assert len(said) == 1 and str(shard) in said[0] and "truncated" in said[0], said
    assert tree_digest(run) == before


def test_resume_refusal_names_the_narrowest_key(tmp_path, run_copy, prepared_sources):
    tree, run = run_copy
    moved = source_copy(tmp_path, prepared_sources["code"])
    job = job_with(tmp_path, tree, {"data.sources[0].path": moved})
    before = tree_digest(run)
    out = raycpt("train", job)
    assert_clean(out, "data.sources[0].path", "resume.allow_changes=[data.sources]", before_ray_s=EARLY_S)
    assert tree_digest(run) == before


# ---- storage that does not answer -----------------------------------------------------------

@pytest.fixture
def silent_endpoint():
    """A loopback TCP server that accepts connections and never answers."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def closed_port_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_unreachable_storage_fails_within_seconds(tmp_path, request, kind):
    endpoint = request.getfixturevalue("silent_endpoint") if kind == "silent" else closed_port_endpoint()
    job = Path(config_only_job(tmp_path))
    tree = yaml.safe_load(job.read_text())
    tree["run"].update(storage="s3://raycpt-test/runs", s3_endpoint_url=endpoint)
    out = raycpt("train", write_yaml(job, tree))
    assert_clean(out, "run.storage", "s3://raycpt-test", endpoint, before_ray_s=EARLY_S)
    assert ("timeout" if kind == "silent" else "connect") in out.stderr.lower()


def test_storage_probe_deadline_in_process(silent_endpoint):
    from raycpt import storage
    from raycpt.storage import PROBE_DEADLINE_S, StorageError, check_reachable

    storage.configure_storage(silent_endpoint)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="(?i)timeout|no answer"):
        check_reachable("s3://raycpt-test/x", "run.storage")
    assert time.monotonic() - t0 < PROBE_DEADLINE_S + 2


# ---- met by the workers: one paragraph, no retry ------------------------------------------------

def test_corrupt_data_pages_fail_the_run_once_naming_the_shard(tmp_path, good_job, prepared_sources):
    """Pages damaged under a valid footer pass every driver check; the reader meets them in a
    worker. The run must end at the first attempt (max_failures=3 notwithstanding), exit 2, naming
    the shard."""

    def damage_pages(folder: Path) -> None:
        for shard in sorted((folder / "train").glob("*.parquet")):
            data = bytearray(shard.read_bytes())
            data[8:len(data) // 2] = bytes(len(data) // 2 - 8)  # footer and magic bytes intact
            shard.write_bytes(bytes(data))

    src = source_copy(tmp_path, prepared_sources["code"], damage_pages)
    store = tmp_path / "runs"
    job = job_with(tmp_path, good_job, {"data.sources[0].path": src, "run.storage": str(store),
                                        "checkpoint.max_failures": 3, "scaling.num_workers": 1})
    out = raycpt("train", job, timeout_s=400)
    assert out.rc == 2, out.stderr[-3000:]
    starts = list((store / good_job["run"]["name"] / "metrics" / "starts").glob("*.json"))
    assert len(starts) == 1, f"retried: {len(starts)} starts"
    # raycpt's paragraph, once, naming the shard, with nothing of the workers' tracebacks (they are
    # in the run's log file) and not Ray Data's note on its retry settings.
    assert out.stderr.count("raycpt train:") == 1
    paragraph = out.stderr[out.stderr.index("raycpt train:"):]
    assert f"{src}/train/part-" in paragraph and "re-run prepare" in paragraph
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr, out.stderr[-3000:]
    assert "DataContext" not in out.stderr, out.stderr[-3000:]


# ---- the local Ray raycpt starts: loopback only, token file private ------------------------------

_LIST_RAY_SOCKETS = """
import json, os, psutil, time
from raycpt.local_ray import prefer_loopback
prefer_loopback()  # what `raycpt` does before anything imports Ray
from raycpt.launch import connect_ray
connect_ray()
import ray
time.sleep(2)  # the agents bind after the node is up
listen = set()
for p in psutil.Process().children(recursive=True):
    try:
        listen |= {(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print("SOCKETS " + json.dumps(sorted(listen)))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("x" * 32)
    os.chmod(home / ".ray" / "auth_token", 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE")}
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    try:
        p = subprocess.run([sys.executable, "-c", _LIST_RAY_SOCKETS], capture_output=True, text=True, timeout=300,
                           env={**env, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
                                "HOME": str(home)})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("SOCKETS ")), None)
    assert line, p.stderr[-3000:]
    sockets = json.loads(line[len("SOCKETS "):])
    assert len(sockets) >= 5, sockets  # gcs, raylet, agents, dashboard, metrics: they were seen
    exposed = [s for s in sockets if s[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert oct(os.stat(home / ".ray" / "auth_token").st_mode & 0o777) == "0o600"


# ---- prepare ------------------------------------------------------------------------------------

def _prepare(tmp_path: Path, tokenizer: str, inputs: list[str], output: str | None = None) -> Outcome:
    return raycpt("prepare", "--input", *inputs, "--tokenizer", tokenizer, "--seq-len", "64",
                  "--output", output or str(tmp_path / "out"), timeout_s=300)


@pytest.mark.parametrize("case", ["no tokenizer", "output is a file", "binary input", "missing input"])
def test_prepare_refuses_before_ray(tmp_path, tokenizer_dir, case):
    text = tmp_path / "doc.txt"
    text.write_text("some text " * 200)
    if case == "no tokenizer":
        out, named = _prepare(tmp_path, str(tmp_path / "no-tok"), [str(text)]), ["--tokenizer", "no-tok"]
    elif case == "output is a file":
        out, named = _prepare(tmp_path, tokenizer_dir, [str(text)], str(text)), ["--output", "is a file"]
    elif case == "binary input":
        blob = tmp_path / "blob.txt"
        blob.write_bytes(bytes(range(256)) * 64)
        out, named = _prepare(tmp_path, tokenizer_dir, [str(blob)]), ["--input", "binary"]
    else:
        out, named = _prepare(tmp_path, tokenizer_dir, [str(tmp_path / "gone.jsonl")]), ["gone.jsonl", "does not exist"]
    assert_clean(out, *named, before_ray_s=EARLY_S)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_prepare_names_the_broken_jsonl_line(tmp_path, tokenizer_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(5)) + '{"text": "cut\n')
    out = _prepare(tmp_path, tokenizer_dir, [str(docs)])
    assert out.rc == 2, out.stderr[-3000:]
    # raycpt's paragraph, once; Ray Data logs its own account of the failed task above it.
    assert out.stderr.count("raycpt prepare:") == 1
    paragraph = out.stderr[out.stderr.index("raycpt prepare:"):].splitlines()[0]
    assert "docs.jsonl:6" in paragraph and "not valid JSON" in paragraph
    assert not (tmp_path / "out" / "manifest.json").exists()
