"""The stream: each worker's slice of every global batch, read through Ray Data.

Every training worker runs its own small Ray Data pipeline: a range of step numbers flows into
one `BatchReader` actor that computes the plan for that step (`plan.py`, pure), keeps this
worker's slice, and reads those rows from the Parquet shards (local or s3://) with a bounded
cache of row groups. Ray Data runs the reads as a Ray actor task ahead of the training loop
(`prefetch_batches`), so the loop only waits when the storage cannot keep up; no worker waits
on another, and nothing but the global plan state is needed to resume.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from raycpt import storage
from raycpt.config import JobConfig, source_weights
from raycpt.data.manifest import DataError, Manifest, read_manifest
from raycpt.data.plan import BlendPlan, PlanState, SourceSpec, split_sample_id, worker_slice
from raycpt.data.verify import check_token_rows, read_shard_rows

# Ray Data is asked for this many steps per dataset; a long run chains datasets.
_STEPS_PER_DATASET = 10_000
# Steps per Ray Data block: one reader call reads several steps, so the per-block overhead of
# the streaming executor (tens of ms) is paid once per few steps, not every step.
_STEPS_PER_BLOCK = 4


@dataclass(frozen=True)
class StreamSpec:
    """Plain values that fully determine a worker's stream (shipped to the reader actor)."""

    source_names: list[str]
    source_uris: list[str]
    shard_paths: list[list[str]]
    shard_rows: list[list[int]]
    epochs: list[int | None]
    rows_per_row_group: list[int]
    seq_len: int
    vocab_size: int
    weights: list[float]
    phases: list[tuple[int, list[float]]]
    global_batch_size: int
    seed: int
    window_rows: int
    plan_state: dict[str, Any] | None
    rank: int
    world_size: int
    cache_bytes: int = 256 << 20
    s3_endpoint_url: str | None = None


def read_manifests(job: JobConfig) -> list[Manifest]:
    return [read_manifest(s.path, key=f"data.sources[{i}].path") for i, s in enumerate(job.data.sources)]


def build_plan(spec: StreamSpec) -> BlendPlan:
    sources = [SourceSpec(n, tuple(r), e) for n, r, e in zip(spec.source_names, spec.shard_rows, spec.epochs)]
    state = PlanState.from_state_dict(spec.plan_state) if spec.plan_state else None
    return BlendPlan(sources, spec.weights, spec.global_batch_size, spec.seed, spec.window_rows,
                     phases=spec.phases, state=state)


def make_spec(job: JobConfig, manifests: list[Manifest], plan_state: dict[str, Any] | None,
              rank: int, world_size: int, vocab_size: int) -> StreamSpec:
    d = job.data
    phases = [(p.start_step, source_weights(d, p.weights)) for p in d.phases]
    return StreamSpec(
        source_names=[s.name for s in d.sources],
        source_uris=[m.uri for m in manifests],
        shard_paths=[[f.path for f in m.train.files] for m in manifests],
        shard_rows=[[f.rows for f in m.train.files] for m in manifests],
        epochs=[s.epochs for s in d.sources],
        rows_per_row_group=[m.rows_per_row_group for m in manifests],
        seq_len=d.seq_len, vocab_size=vocab_size, weights=source_weights(d), phases=phases,
        global_batch_size=job.train.global_batch_size, seed=job.run.seed,
        window_rows=d.shuffle_window_rows, plan_state=plan_state, rank=rank, world_size=world_size,
        s3_endpoint_url=job.run.s3_endpoint_url,
    )


class RowGroupCache:
    """Decoded Parquet row groups, least recently used evicted past a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.groups: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self.files: dict[tuple[int, int], pq.ParquetFile] = {}

    def get(self, key: tuple[int, int, int], load) -> np.ndarray:
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        arr = load()
        self.groups[key] = arr
        self.used += arr.nbytes
        while self.used > self.budget and len(self.groups) > 1:
            _, old = self.groups.popitem(last=False)
            self.used -= old.nbytes
        return arr


class BatchReader:
    """Ray Data UDF (one actor per worker): step numbers in, this worker's rows out."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        storage.configure_storage(spec.s3_endpoint_url)  # the reader actor is its own process
        self.plan = build_plan(spec)
        self.cache = RowGroupCache(spec.cache_bytes)
        self.pending: dict[int, np.ndarray] = {}

    def _shard(self, source: int, shard: int) -> pq.ParquetFile:
        key = (source, shard)
        if key not in self.cache.files:
            uri = storage.join(self.spec.source_uris[source], self.spec.shard_paths[source][shard])
            fs, path = storage.pyarrow_filesystem(uri)
            try:
                pf = storage.with_retries(lambda: pq.ParquetFile(fs.open_input_file(path)), f"opening {uri}")
            except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
                raise DataError(f"{uri}: unreadable Parquet shard ({type(e).__name__}: {e}); re-run prepare") from None
            field = pf.schema_arrow.field(0) if pf.schema_arrow.names == ["input_ids"] else None
            if field is None or getattr(field.type, "list_size", None) != self.spec.seq_len:
                raise DataError(f"{uri}: schema {pf.schema_arrow} is not input_ids: fixed_size_list<int32>"
                                f"[{self.spec.seq_len}]; re-run prepare")
            self.cache.files[key] = pf
        return self.cache.files[key]

    def _row_group(self, source: int, shard: int, group: int) -> np.ndarray:
        def load() -> np.ndarray:
            pf = self._shard(source, shard)
            uri = f"{self.spec.source_uris[source]}/{self.spec.shard_paths[source][shard]}"
            try:
                col = storage.with_retries(lambda: pf.read_row_group(group, columns=["input_ids"]).column(0),
                                           f"reading {uri}")
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{uri}: row group {group} unreadable ({type(e).__name__}: {e}); "
                                "re-run prepare") from None
            arr = col.combine_chunks().values.to_numpy().reshape(-1, self.spec.seq_len)
            check_token_rows(arr, uri, group * self.spec.rows_per_row_group[source], self.spec.vocab_size)
            return arr

        return self.cache.get((source, shard, group), load)

    def read_rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.spec.seq_len), dtype=np.int32)  # half the bytes of int64 to ship
        for j, sid in enumerate(ids.tolist()):
            source, _epoch, row = split_sample_id(sid)
            shard, in_shard = self.plan.orders[source].locate(row)
            rpg = self.spec.rows_per_row_group[source]
            out[j] = self._row_group(source, shard, in_shard // rpg)[in_shard % rpg]
        return out

    def slice_for_step(self, step: int) -> np.ndarray:
        if step < self.plan.state.step and step not in self.pending:
            raise RuntimeError(f"step {step} requested after the plan moved past it")
        while self.plan.state.step <= step:
            s = self.plan.state.step
            self.pending[s] = worker_slice(self.plan.next_batch(), self.spec.rank, self.spec.world_size)
        return self.pending.pop(step)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        steps = batch["id"].astype(np.int64)
        ids = [self.slice_for_step(int(s)) for s in steps]
        rows = [self.read_rows(x) for x in ids]
        return {"step": steps, "input_ids": np.stack(rows), "sample_ids": np.stack(ids)}


def iter_local(spec: StreamSpec, start_step: int, end_step: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The same stream without Ray (benchmarks and per-rank unit tests)."""
    reader = BatchReader(spec)
    for step in range(start_step, end_step):
        out = reader({"id": np.array([step])})
        yield int(out["step"][0]), out["input_ids"][0], out["sample_ids"][0]


def iter_ray_data(spec: StreamSpec, start_step: int, end_step: int, prefetch_batches: int,
                  reader_cpus: float) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(step, input_ids [rows, seq_len], sample_ids [rows]) for this worker, through Ray Data
    (a `DataStream` whose position is `spec.plan_state`, which must be at `start_step`)."""
    stream = DataStream(spec, end_step, prefetch_batches=prefetch_batches, reader_cpus=reader_cpus)
    if stream.step != start_step:
        raise ValueError(f"the spec's plan state is at step {stream.step}, not {start_step}")
    while stream.step < end_step:
        step = stream.step
        input_ids, sample_ids = stream.next()
        yield step, input_ids, sample_ids


class DataStream:
    """This worker's batches, and the run's data position: the one holder of the plan state.

    The reader (a Ray Data actor, or in-process with `local=True`) computes each step's sample ids
    from the plan state it was started with; this object advances its own copy of the plan in
    lock-step with the batches the loop takes, without building sample ids (`BlendPlan.advance`),
    so its `state_dict()` is the position a checkpoint stores and the start of the reader's next
    dataset in a long run: nothing is replayed.
    """

    def __init__(self, spec: StreamSpec, end_step: int, prefetch_batches: int = 4, reader_cpus: float = 0.25,
                 local: bool = False, steps_per_dataset: int = _STEPS_PER_DATASET):
        self.spec = spec
        self.end_step = end_step
        self.prefetch_batches = prefetch_batches
        self.reader_cpus = reader_cpus
        self.local = local
        self.steps_per_dataset = steps_per_dataset
        self.plan = build_plan(spec)
        self.wait_s = 0.0  # time the loop spent blocked on the next batch
        self._batches: Iterator[tuple[int, np.ndarray, np.ndarray]] | None = None
        self._first: threading.Thread | None = None  # start(): the reader's start, off the loop's thread
        self._first_batch: tuple[int, np.ndarray, np.ndarray] | BaseException | None = None

    @property
    def step(self) -> int:
        """The next global batch index."""
        return self.plan.state.step

    def state_dict(self) -> dict[str, Any]:
        return self.plan.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()  # the reader restarts from the loaded position
        self.plan.state = PlanState.from_state_dict(state)

    def start(self) -> None:
        """Start the reader and fetch the first batch in the background, so that the reader's
        start (a Ray Data pipeline and its reader actor: seconds) overlaps the work before the
        first step, such as the step-0 evaluation. `next()` waits for it."""
        if self._batches is not None:
            return
        self._batches = self._open()

        def fetch() -> None:
            try:
                self._first_batch = next(self._batches)
            except BaseException as e:  # noqa: BLE001 - re-raised by next() on the loop's thread
                self._first_batch = e

        self._first = threading.Thread(target=fetch, name="raycpt-first-batch", daemon=True)
        self._first.start()

    def _take_first(self) -> tuple[int, np.ndarray, np.ndarray]:
        assert self._first is not None
        self._first.join()
        self._first, first = None, self._first_batch
        self._first_batch = None
        if isinstance(first, BaseException):
            raise first
        return first

    def tokens_per_source(self) -> dict[str, int]:
        return self.plan.tokens_per_source(self.spec.seq_len)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [rows, seq_len], sample_ids [rows]) of this worker's slice of the next step."""
        if self._batches is None:
            self._batches = self._open()
        t = time.perf_counter()
        try:
            data_step, input_ids, sample_ids = self._take_first() if self._first is not None else next(self._batches)
        finally:
            self.wait_s += time.perf_counter() - t
        if data_step != self.step:
            raise RuntimeError(f"data stream at step {data_step}, training at {self.step}")
        self.plan.advance()
        return input_ids, sample_ids

    def close(self) -> None:
        """Stop the reader (Ray Data's prefetching threads) before the end of the steps."""
        if self._first is not None:
            self._first.join()
            self._first = self._first_batch = None
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _open(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return self._local() if self.local else self._ray_data()

    def _reader_spec(self) -> StreamSpec:
        return StreamSpec(**{**asdict(self.spec), "plan_state": self.state_dict()})

    def _local(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        reader = BatchReader(self._reader_spec())
        for step in range(self.step, self.end_step):
            out = reader({"id": np.array([step])})
            yield int(out["step"][0]), out["input_ids"][0], out["sample_ids"][0]

    def _ray_data(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.raise_original_map_exception = True  # a reader's DataError reaches the loop as itself (no retry)
        while self.step < self.end_step:
            # The loop has taken every batch of the previous dataset, so this holder is at `first`.
            first = self.step
            last = min(self.end_step, first + self.steps_per_dataset)
            blocks = -(-(last - first) // _STEPS_PER_BLOCK)
            ds = ray.data.range(last - first, override_num_blocks=blocks).map_batches(
                # The step-number tasks ask for a reader's share of a CPU, not a whole one: training
                # workers may hold every whole CPU of their nodes.
                lambda b, o=first: {"id": b["id"] + o}, batch_size=None, zero_copy_batch=True,
                num_cpus=self.reader_cpus,
            ).map_batches(BatchReader, fn_constructor_args=(self._reader_spec(),), batch_size=_STEPS_PER_BLOCK,
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=self.reader_cpus, batch_format="numpy")
            for batch in ds.iter_batches(batch_size=1, prefetch_batches=self.prefetch_batches,
                                         batch_format="numpy"):
                yield int(batch["step"][0]), batch["input_ids"][0], batch["sample_ids"][0]


def read_eval_rows(m: Manifest, max_rows: int) -> np.ndarray:
    """The first `max_rows` held-out rows of a source (fixed, so every eval compares alike)."""
    rows: list[np.ndarray] = []
    need = max_rows
    for f in m.eval.files:
        if need <= 0:
            break
        try:
            arr = read_shard_rows(m, f, need)
        except Exception as e:  # noqa: BLE001 - whatever the reader says, name the file
            raise DataError(f"{m.file_uri(f)}: unreadable eval shard ({type(e).__name__}: {e})") from None
        rows.append(arr)
        need -= len(arr)
    if not rows:
        return np.zeros((0, m.seq_len), dtype=np.int64)
    return np.concatenate(rows).astype(np.int64)
