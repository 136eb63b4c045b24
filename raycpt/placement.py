"""Give a Train run's worker resources back, whatever Ray Train's own cleanup manages.

A Ray Train controller creates the placement group of its workers. Ray scopes a placement group
made by an ordinary actor to the *job* (the driver): when Tune stops a trial early, or when a
controller gives up after a worker died in the middle of one of its calls, the workers'
placement group can stay reserved until the driver exits (ray-project/ray#54305), and later runs
or trials wait for CPUs/GPUs nobody uses. Ray 2.60's own fix (a detached PlacementGroupCleaner
per run) needs the dashboard's state API and gives up when the GCS is slow, so raycpt does not
rely on it alone.

The driver (`raycpt train`, or the sweep driver of `raycpt tune`) owns a registry actor. Every
controller registers each worker placement group it creates (`RegisterPlacementGroups`, a Ray
Train worker-group callback) under a key (the run, or the trial); when that run or trial is over,
the driver releases the key: the registry removes every placement group of it still alive, a
controller of a released key starts no new worker group, and one registered later (a restart
that began before the release) is removed on arrival.
"""

from __future__ import annotations

import logging

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # Ray 2.60; pinned in pyproject
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

logger = logging.getLogger(__name__)


def registry_name(owner: str) -> str:
    return f"raycpt-pgs-{owner}"


@ray.remote(num_cpus=0)
class PlacementGroupRegistry:
    """Which placement groups each key's (run's or trial's) controllers created; lives as long as
    its driver."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[PlacementGroup]] = {}
        self._released: set[str] = set()

    def register(self, key: str, pg: PlacementGroup) -> bool:
        if key in self._released:
            _remove(pg)
            return False
        self._by_key.setdefault(key, []).append(pg)
        return True

    def is_released(self, key: str) -> bool:
        return key in self._released

    def reopen(self, key: str) -> None:
        """The run or trial starts again: its placement groups are wanted again."""
        self._released.discard(key)

    def release(self, key: str) -> int:
        """Remove the key's placement groups that still exist; returns how many."""
        self._released.add(key)
        return sum(_remove(pg) for pg in self._by_key.pop(key, []))


def _remove(pg: PlacementGroup) -> bool:
    try:
        if placement_group_table(pg).get("state") == "REMOVED":
            return False
        remove_placement_group(pg)
        return True
    except Exception as e:  # noqa: BLE001 - already gone, or the GCS is busy: nothing more to do here
        logger.warning("raycpt: could not remove placement group %s: %s", pg.id.hex(), e)
        return False


class RegisterPlacementGroups(WorkerGroupCallback):
    """Ray Train callback (runs in the controller): registers each worker placement group with the
    driver's registry under `key`."""

    def __init__(self, registry: str, key: str):
        self._registry = registry
        self._key = key

    def before_worker_group_start(self, worker_group_context) -> None:
        # A released run or trial (one the sweep stopped) gets no new worker group. Its controller,
        # restarting the workers whose group was just removed, would otherwise reserve a new
        # placement group and could be killed with the trial before registering it: reserved
        # until the driver exits (seen as 2 leaked groups after an ASHA sweep).
        try:
            released = ray.get(ray.get_actor(self._registry).is_released.remote(self._key), timeout=30)
        except Exception:  # noqa: BLE001 - the driver is gone: its job ends, and its groups with it
            return
        if released:
            raise RuntimeError(f"raycpt: {self._key} was released by its driver; no new worker group")

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            registry = ray.get_actor(self._registry)
            ray.get(registry.register.remote(self._key, pg), timeout=30)
        except Exception as e:  # noqa: BLE001 - the driver is gone: its job ends, and its groups with it
            logger.warning("raycpt: placement group %s not registered with its driver: %s", pg.id.hex(), e)
