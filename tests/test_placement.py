"""The driver's placement-group registry and the Ray Train callback that consults it: a run or
trial its driver released (a trial the sweep stopped) starts no new worker group."""

from __future__ import annotations

import uuid

import pytest

from raycpt.placement import PlacementGroupRegistry, RegisterPlacementGroups, registry_name


def test_a_released_key_gets_no_new_worker_group_until_it_is_reopened(ray_local):
    name = registry_name(f"test-{uuid.uuid4().hex[:8]}")
    registry = PlacementGroupRegistry.options(name=name).remote()
    try:
        trial, other = RegisterPlacementGroups(name, "trial-1"), RegisterPlacementGroups(name, "trial-2")
        trial.before_worker_group_start(None)  # nothing released yet: the start goes ahead

        assert ray_local.get(registry.release.remote("trial-1")) == 0  # no group registered yet
        with pytest.raises(RuntimeError, match="trial-1 was released by its driver"):
            trial.before_worker_group_start(None)
        other.before_worker_group_start(None)  # another trial of the same sweep is not affected

        ray_local.get(registry.reopen.remote("trial-1"))  # Tune starts the trial again
        trial.before_worker_group_start(None)
    finally:
        ray_local.kill(registry)


def test_a_driver_that_is_gone_does_not_stop_the_start(ray_local):
    # Without its registry (the driver exited) the callback lets the controller go on: the job
    # ends with its driver, and its placement groups with it.
    RegisterPlacementGroups(registry_name(f"gone-{uuid.uuid4().hex[:8]}"), "run").before_worker_group_start(None)
