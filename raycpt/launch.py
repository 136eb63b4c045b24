"""The driver side of `raycpt train`: connect to Ray, start a TorchTrainer, return its result.

The Ray Train run name is the job's `run.name` and its storage is `run.storage`, so a job that is
resubmitted (same YAML, new driver, even a new cluster) lands in the same run folder; the
workers' start decision then finds the newest committed checkpoint there.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

from raycpt import storage
from raycpt.config import JobConfig
from raycpt.errors import find_raycpt_error

# What a Ray worker process imports before it is given work, when the local Ray is started with
# them (`preload_modules`): a trial's driver, Ray Train controller and training worker are three
# fresh processes, each of which would import these (seconds each) before its first step.
TRAINING_MODULES = ("torch", "transformers", "ray.train.torch", "ray.data", "raycpt.train.loop", "raycpt.tune.trial")


def connect_ray(min_cpus: float = 0, address: str | None = None, preload_modules: tuple[str, ...] = ()) -> None:
    """Join the cluster named by `address`/RAY_ADDRESS, or start a local one sized for the job.

    `preload_modules`: a local Ray's idle worker processes import these while they wait (Ray's
    `preload_python_modules`; on a cluster, set RAY_preload_python_modules on `ray start`)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        from raycpt.local_ray import prefer_loopback

        prefer_loopback()  # effective where Ray is not imported yet (the CLI sets it earlier)
    import ray

    from raycpt.logs import route_ray_output

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        route_ray_output()  # Ray's own lines to its session's logs folder (raycpt/logs.py)
        return
    # Reader and prepare tasks are I/O bound: give the local node a few logical CPUs more than
    # the training workers hold so they always fit beside them.
    cpus = max(os.cpu_count() or 1, int(min_cpus + 0.999) + 2)
    # "local": a Ray some other program started on this machine is not ours to join (nor sized for us).
    # Its processes inherit this environment (AWS credentials included) from the raylet this
    # call starts; credentials are never put in a runtime_env, which Ray shows in its dashboard.
    system_config = {"preload_python_modules": list(preload_modules)} if preload_modules else None
    from raycpt.local_ray import local_ray_options, restrict_token_file

    restrict_token_file()  # one Ray wrote earlier
    ray.init(address="local", num_cpus=cpus, log_to_driver=True, _system_config=system_config, **local_ray_options())
    restrict_token_file()  # one this start wrote
    route_ray_output()


def ray_storage(job: JobConfig) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    uri = job.run.storage
    if uri.startswith("s3://") and job.run.s3_endpoint_url:
        fs, path = storage.pyarrow_filesystem(uri)
        return path, fs
    if not storage.is_remote(uri):
        path = storage.local_path(uri)
        os.makedirs(path, exist_ok=True)
        return path, None
    return uri, None


def _torch_config_with_sigterm_hook(backend: str):
    """Ray's TorchConfig, whose start hook also installs raycpt's SIGTERM handler on every worker
    (the hook's tasks run on the worker actor's main thread, the only place a handler can go)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    from raycpt.train.signals import install_sigterm_hook

    class _Backend(_TorchBackend):
        def on_training_start(self, worker_group, backend_config) -> None:
            super().on_training_start(worker_group, backend_config)
            worker_group.execute(install_sigterm_hook)

    class _Config(TorchConfig):
        @property
        def backend_cls(self):
            return _Backend

    return _Config(backend=backend)


def build_trainer(job: JobConfig, loop_options: dict[str, Any] | None = None, callbacks: list[Any] | None = None,
                  gpus_per_worker: float = 1.0):
    """`callbacks`: Ray Train callbacks, e.g. the one a sweep trial forwards metrics to Tune with;
    `gpus_per_worker` < 1: a share of a GPU, so several sweep trials train on one (tune.gpus_per_trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raycpt.train.not_retried import StopOnRaycptError, run_worker

    lo, hi = job.worker_range()
    num_workers: int | tuple[int, int] = lo if lo == hi else (lo, hi)
    storage_path, fs = ray_storage(job)
    return TorchTrainer(
        run_worker,
        train_loop_config={"job": job.model_dump(mode="json"), **(loop_options or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=job.scaling.use_gpu,
            resources_per_worker={"CPU": job.scaling.cpus_per_worker,
                                  **({"GPU": gpus_per_worker} if job.scaling.use_gpu else {})},
        ),
        torch_config=_torch_config_with_sigterm_hook(backend="nccl" if job.scaling.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=job.run.name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.checkpoint.max_failures),
            # Ray records a pointer per committed checkpoint and prunes those pointers itself;
            # raycpt applies retention to the checkpoints (never deleting the newest committed).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[*(callbacks or []), StopOnRaycptError()],  # raycpt's own errors are not retried
        ),
    )


def preflight(job: JobConfig, address: str | None = None, reads_weights: bool = True) -> str:
    """Checks on the driver before Ray starts (raycpt/preflight.py); returns the start message."""
    from raycpt.preflight import check_job

    return check_job(job, joins_cluster=bool(address or os.environ.get("RAY_ADDRESS")), reads_weights=reads_weights)


def train(job: JobConfig, address: str | None = None, loop_options: dict[str, Any] | None = None):
    """Run the job to the end (or its failure); returns Ray Train's Result."""
    import uuid

    storage.configure_storage(job.run.s3_endpoint_url)
    reads_weights = not (loop_options or {}).get("random_weights")
    print(f"raycpt: {preflight(job, address, reads_weights)}", flush=True)  # before Ray is even imported

    import ray.train
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raycpt.logs import route_ray_logs_to_run
    from raycpt.placement import PlacementGroupRegistry, RegisterPlacementGroups, registry_name

    lo, hi = job.worker_range()
    connect_ray(min_cpus=hi * job.scaling.cpus_per_worker, address=address)
    route_ray_logs_to_run(job.run_uri)
    name = registry_name(f"run-{job.run.name}-{uuid.uuid4().hex[:8]}")
    # On the driver's node: a registry on a spot worker node would go with that node.
    registry = PlacementGroupRegistry.options(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True)).remote()
    callbacks = [RegisterPlacementGroups(name, job.run.name)]

    def release() -> None:
        try:
            ray.get(registry.release.remote(job.run.name), timeout=60)
            ray.get(registry.reopen.remote(job.run.name), timeout=60)
        except Exception as e:  # noqa: BLE001 - cleanup only: the run's outcome stands
            print(f"raycpt: could not release the run's placement groups: {type(e).__name__}: {e}", flush=True)

    try:
        for attempt in controller_attempts(job.checkpoint.max_failures):
            try:
                return build_trainer(job, loop_options, callbacks=callbacks).fit()
            except ray.train.ControllerError as e:
                err = find_raycpt_error(e)
                if err is not None and not err.retry_in_workers:  # a worker's raycpt error: report it
                    return _FailedResult(e)
                # Ray Train's controller gave up (a worker died in the middle of one of its own
                # calls), which FailureConfig does not retry and which can leave the workers'
                # placement group reserved: give it back and fit again; the run resumes from its
                # newest committed checkpoint, as a resubmission would.
                if attempt == job.checkpoint.max_failures:
                    return _FailedResult(e)  # released below
                release()
                of = "unlimited" if job.checkpoint.max_failures < 0 else job.checkpoint.max_failures
                print(f"raycpt: Ray Train's controller failed ({str(e).splitlines()[0][:200]}); "
                      f"starting again ({attempt + 1}/{of})", flush=True)
            except ray.train.TrainingFailedError as e:
                return _FailedResult(e)
    finally:
        release()
        ray.kill(registry)


def controller_attempts(max_failures: int) -> Iterator[int]:
    """Attempt numbers 0, 1, ... for `checkpoint.max_failures` retries after the first fit; -1
    retries without end (as Ray's FailureConfig reads -1)."""
    return itertools.count() if max_failures < 0 else iter(range(max_failures + 1))


class _FailedResult:
    """fit() raised: the same shape as a Result with its error set."""

    def __init__(self, error: BaseException):
        self.error = error
