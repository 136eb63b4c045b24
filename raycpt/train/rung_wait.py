"""A sweep trial stops at each rung of synchronous successive halving until the sweep says on.

Tune judges a trial on a result that travels worker -> Train controller (polled every 2 s) ->
the trial's driver -> Tune's driver; a PAUSE or STOP then takes the trial's actors down. A trial
that trains on meanwhile spends steps the verdict may throw away: on an H200, 5 trials of
SmolLM2-135M packed on one GPU reached steps 175-275 before their step-25 rung was judged
(docs/deploying.md, Sweep). So at a rung the workers commit that step's checkpoint, report it (the
rung's result reaches Tune only then, raycpt/tune/trial.py) and wait until the scheduler writes an
allowance past the rung: a trial it promotes, or lets train on while no other trial waits for its
slot, reads one within a poll; a trial it pauses or stops is taken down while it waits, its
rung checkpoint committed and nothing trained past it.

The allowance is one small JSON file per trial, written by the scheduler in the sweep's driver
(`write_allowance`) and read by rank 0 here: {"train_to": N} lets the trial train through the steps
before N and stop at the rung N; {"train_to": null} lets it run to its budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from raycpt import storage

NO_LIMIT = None


def allowance_uri(folder: str, trial_id: str) -> str:
    return storage.join(folder, f"{trial_id}.json")


def write_allowance(uri: str, train_to: int | None) -> None:
    storage.write_json(uri, {"train_to": train_to})


def may_pass(uri: str, step: int) -> bool:
    """May a trial waiting at rung `step` train on? False while no allowance is written."""
    try:
        train_to = storage.read_json(uri)["train_to"]
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return train_to is NO_LIMIT or int(train_to) > step


@dataclass(frozen=True)
class RungWait:
    rungs: tuple[int, ...]
    allowance_uri: str
    poll_s: float = 0.5
    # A verdict comes within seconds of the rung's result reaching Tune; past this the trial trains
    # on (and says so) rather than hold its share of the GPU for a verdict that is not coming.
    max_wait_s: float = 600.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "RungWait | None":
        """From the loop option `rung_wait: {rungs, allowance_uri[, poll_s, max_wait_s]}` (sweep trials only)."""
        spec = options.get("rung_wait")
        if not spec:
            return None
        return cls(tuple(int(r) for r in spec["rungs"]), str(spec["allowance_uri"]),
                   float(spec.get("poll_s", 0.5)), float(spec.get("max_wait_s", 600.0)))

    def is_rung(self, step: int) -> bool:
        """A step the loop saves a checkpoint at (whatever `checkpoint.interval_steps` says) and holds at."""
        return step in self.rungs

    def hold(self, step: int, rank: int, commit: Callable[[], None], agree: Callable[[bool], bool],
             say: Callable[[str], None]) -> None:
        """At a rung step (its checkpoint saved): `commit` waits for that checkpoint and reports
        it, then every rank waits, polling together, until rank 0 reads an allowance past it."""
        if not self.is_rung(step):
            return
        commit()
        t0 = time.time()
        while not agree(rank == 0 and (may_pass(self.allowance_uri, step) or time.time() - t0 > self.max_wait_s)):
            time.sleep(self.poll_s)
        waited = time.time() - t0
        if waited > self.max_wait_s:
            say(f"rung at step {step}: no verdict from the sweep in {self.max_wait_s:.0f}s "
                f"({self.allowance_uri} not written); training on")
        else:
            say(f"rung at step {step}: the sweep let this trial train on after {waited:.1f}s")
