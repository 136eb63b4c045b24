"""Give a stopped trial's training resources back, whatever Ray Train's own cleanup manages.

A trial's Ray Train controller creates the placement group of its workers. Ray scopes a
placement group made by an ordinary actor to the *job* (here: the sweep driver), so when Tune
stops a trial early, its actor and the controller die but the workers' placement group would
stay reserved until the whole sweep ends (ray-project/ray#54305): later trials then wait for
CPUs/GPUs nobody uses. Ray 2.60's own fix (a detached PlacementGroupCleaner per run) needs the
dashboard's state API and gives up when the GCS is slow, so raycpt does not rely on it alone.

Here the sweep driver owns a registry actor. Every trial's controller registers each worker
placement group it creates (`RegisterPlacementGroups`, a Ray Train worker-group callback); when
Tune reports the trial complete or errored, the driver releases it: the registry removes every
placement group of that trial still alive, and one registered later (a controller restarting
its workers while it is being stopped) is removed on arrival.
"""

from __future__ import annotations

import logging

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # Ray 2.60; pinned in pyproject
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

logger = logging.getLogger(__name__)


def registry_name(sweep: str) -> str:
    return f"raycpt-sweep-pgs-{sweep}"


@ray.remote(num_cpus=0)
class PlacementGroupRegistry:
    """Which placement groups each trial's Train runs created; lives as long as the sweep driver."""

    def __init__(self) -> None:
        self._by_trial: dict[str, list[PlacementGroup]] = {}
        self._released: set[str] = set()

    def register(self, trial_id: str, pg: PlacementGroup) -> bool:
        if trial_id in self._released:
            _remove(pg)
            return False
        self._by_trial.setdefault(trial_id, []).append(pg)
        return True

    def reopen(self, trial_id: str) -> None:
        """Tune (re)starts the trial: its placement groups are wanted again."""
        self._released.discard(trial_id)

    def release(self, trial_id: str) -> int:
        """Remove the trial's placement groups that still exist; returns how many."""
        self._released.add(trial_id)
        return sum(_remove(pg) for pg in self._by_trial.pop(trial_id, []))


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
    """Ray Train callback (runs in the trial's controller): registers each worker placement group
    with the sweep's registry."""

    def __init__(self, registry: str, trial_id: str):
        self._registry = registry
        self._trial_id = trial_id

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            registry = ray.get_actor(self._registry)
            ray.get(registry.register.remote(self._trial_id, pg), timeout=30)
        except Exception as e:  # noqa: BLE001 - the sweep driver is gone: its job ends, and its groups with it
            logger.warning("raycpt: placement group %s not registered with the sweep: %s", pg.id.hex(), e)
