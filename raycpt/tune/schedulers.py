"""Early stopping that works at the concurrency a sweep really has.

Asynchronous successive halving (ASHA) promotes a trial at a rung when it is in the top
1/reduction_factor of the results recorded at that rung *so far*. With many trials running at
once that is a good bet; with few, the early trials meet no rival at their rung and are all
promoted: one H200, one trial at a time, 6 trials of 300 steps, grace 50, factor 3, trained
1,300 of 1,800 trial-steps (issue 17).

`SyncSuccessiveHalving` waits instead: a trial that reaches a rung is judged only when every
trial of the sweep has reached it (or ended); then the best ceil(n / reduction_factor) go on and
the rest stop. At a rung the trial's workers stop and wait (raycpt/train/rung_wait.py): a trial
that must wait for its verdict gives its slot to a trial that needs one (Tune pauses it; it
resumes from its own committed checkpoint at the rung, see raycpt/tune/trial.py), and is allowed
on to the next rung when nobody waits (a pause costs a start-up; going on costs only the steps
of a trial that is then stopped), never further before the verdict. Trials that share a GPU
(`tune.gpus_per_trial` < 1) do not go on: the GPU time-slices between their processes, so one
that trains on while it waits slows the trials the rung waits for (one H200, 9 trials of 135M:
the last three reached step 25 after the others had reached 100-200, and the sweep trained
1,325 of 2,700 trial-steps where the rungs allow 650). This is one bracket of HyperBand (Li et
al. 2018); Ray Tune's `HyperBandScheduler` sizes its brackets from max_t alone (81 trials for
max_t 81, factor 3) and fills them least-aggressive first, so a sweep of 8 trials would run them
all to the end.

Because a paused trial is not finished, a searcher's concurrency limit (BasicVariantGenerator's
max_concurrent, ConcurrencyLimiter) would count it as running and starve the rung of the trials
it waits for; `TrialGate` is the limit this scheduler keeps instead: it counts the trials that
hold (or are about to hold) workers, and `GatedVariantGenerator` / `GatedSearcher` create a
trial only when the gate has room.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from raycpt.train.rung_wait import allowance_uri, write_allowance


def say(msg: str) -> None:
    print(msg, flush=True)


def rung_steps(grace_steps: int, reduction_factor: float, budget_steps: int, every_steps: int) -> list[int]:
    """Steps at which trials are judged, as in a HyperBand bracket: budget / factor^k for
    k = 1, 2, ... while not below the grace period, each rounded down to a multiple of
    `every_steps` (an evaluation step, where a result exists); rising, distinct, below the budget."""
    rungs: set[int] = set()
    k = 1
    while budget_steps / reduction_factor ** k >= grace_steps:
        r = int(budget_steps / reduction_factor ** k // every_steps) * every_steps
        if 0 < r < budget_steps:
            rungs.add(r)
        k += 1
    if not rungs and grace_steps < budget_steps:  # the budget is under factor x grace: one rung at grace
        r = int(grace_steps // every_steps) * every_steps
        rungs = {r} if r > 0 else set()
    return sorted(rungs)


class TrialGate:
    """How many trials may hold workers at once, counted from Tune's own trial states."""

    def __init__(self, max_concurrent: int):
        self.max_concurrent = max_concurrent
        self.controller: Any = None  # the scheduler's view of Tune's controller, set on its first call

    def active(self) -> int:
        if self.controller is None:
            return 0
        return sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in self.controller.get_trials())

    def has_room(self) -> bool:
        return self.active() < self.max_concurrent

    def __getstate__(self) -> dict:
        # Tune saves the search algorithm (and with it this gate) in the experiment state; the
        # controller is the running process's, never saved.
        return {"max_concurrent": self.max_concurrent, "controller": None}


class GatedVariantGenerator(BasicVariantGenerator):
    """Tune's random/grid generator, creating a trial only when the gate has room."""

    def __init__(self, gate: TrialGate, **kwargs):
        super().__init__(max_concurrent=0, **kwargs)
        self.gate = gate

    def next_trial(self):
        if not self.gate.has_room():
            return None
        return super().next_trial()


class GatedSearcher(Searcher):
    """A model-based searcher (Optuna), asked for a trial only when the gate has room."""

    def __init__(self, searcher: Searcher, gate: TrialGate):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher
        self.gate = gate

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if not self.gate.has_room():
            return None
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return self.searcher.get_state()

    def set_state(self, state: dict) -> None:
        self.searcher.set_state(state)


class SyncSuccessiveHalving(FIFOScheduler):
    """Synchronous successive halving over every trial of the sweep (module docstring).

    `rungs`: the steps of `time_attr` at which trials are judged; `on_pause(trial)` runs when a
    trial is paused (the sweep gives its workers' placement group back there)."""

    def __init__(self, rungs: list[int], reduction_factor: float, gate: TrialGate, time_attr: str = "step",
                 metric: str | None = None, mode: str | None = None,
                 on_pause: Callable[[Trial], None] | None = None, log: Callable[[str], None] | None = None,
                 allowances_uri: str | None = None, train_on_while_waiting: bool = True):
        super().__init__()
        self.rungs = list(rungs)
        self.reduction_factor = reduction_factor
        self.gate = gate
        self.time_attr = time_attr
        self._metric, self._mode = metric, mode
        self.on_pause = on_pause
        self.level: dict[str, int] = {}                       # trial id -> index of the rung it must pass next
        self.scores: list[dict[str, float]] = [{} for _ in self.rungs]  # rung -> trial id -> loss (lower better)
        self.last: dict[str, tuple[float, float]] = {}        # trial id -> (time, loss) of its latest result
        self.out: set[str] = set()                            # stopped, finished or failed
        self.stopped_by_rule: set[str] = set()                # stopped here at a rung
        self.to_resume: list[str] = []                        # promoted while paused, in order
        self.paused_unreleased: set[str] = set()              # paused; on_pause not yet called
        self.trials: dict[str, Trial] = {}
        self.num_stopped = 0
        self.log = log or say  # module-level: Tune pickles the scheduler with the experiment
        self.allowances_uri = allowances_uri                  # where trials read how far they may train
        self.allowed: dict[str, int | None] = {}              # trial id -> the allowance last written
        self.train_on_while_waiting = train_on_while_waiting  # False: trials share a device (module docstring)
        self._deciding = False

    # -- Tune's scheduler interface -------------------------------------------------------------

    def set_search_properties(self, metric, mode, **spec) -> bool:
        if self._metric and metric or self._mode and mode:
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self.gate.controller = tune_controller
        self.trials[trial.trial_id] = trial
        self.level.setdefault(trial.trial_id, 0)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self.gate.controller = tune_controller
        tid = trial.trial_id
        if self.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        loss = float(result[self._metric]) * (1.0 if self._mode == "min" else -1.0)
        self.last[tid] = (float(result[self.time_attr]), loss)
        lvl = self.level.get(tid, 0)
        if lvl >= len(self.rungs) or self.last[tid][0] < self.rungs[lvl]:
            self._allow(tid)
            return TrialScheduler.CONTINUE
        self.scores[lvl].setdefault(tid, loss)  # judged on its first result at or past the rung
        stopped = self._decide(tune_controller, current=tid)
        if tid in stopped:
            return TrialScheduler.STOP
        waiting = self.level[tid] == lvl  # for its verdict at this rung
        if waiting and self._slot_wanted(tune_controller):
            self.paused_unreleased.add(tid)  # on_pause once its actor has stopped (choose_trial_to_run)
            return TrialScheduler.PAUSE
        # Promoted, or no other trial needs the slot: on to the next rung (where it waits again),
        # unless it would take device time from the trials the rung waits for.
        if not waiting or self.train_on_while_waiting:
            self._allow(tid)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # Tune calls this for a failure it retries (tune.max_trial_failures) as for a last one;
        # the trial's status tells them apart later (`_alive`), when the next call judges.
        self.gate.controller = tune_controller

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        """New trials first (the rung cannot be judged before they reach it), then promoted ones;
        never a paused trial that still waits for its rung's verdict."""
        self.gate.controller = tune_controller
        for tid in list(self.paused_unreleased):
            if self.trials[tid].status == Trial.PAUSED:
                # Its actor has stopped: give the workers' placement group back (ray#54305).
                self.paused_unreleased.discard(tid)
                if self.on_pause is not None:
                    self.on_pause(self.trials[tid])
        self._decide(tune_controller, current=None)  # a trial that failed for good may complete a rung
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        while self.to_resume and self.gate.has_room():
            trial = self.trials[self.to_resume[0]]
            if trial.status == Trial.PAUSED:
                return trial  # Tune sets it PENDING and starts it; the next call moves on
            self.to_resume.pop(0)
        return None

    def debug_string(self) -> str:
        judged = ", ".join(f"{r}: {len(s)} judged" for r, s in zip(self.rungs, self.scores))
        return f"Using synchronous successive halving: rungs at steps {judged}; {self.num_stopped} stopped"

    # -- the rule --------------------------------------------------------------------------------

    def _to_come(self, tune_controller) -> int:
        """Trials the searcher has not created yet (0 once it is exhausted)."""
        search_alg = tune_controller.search_alg
        total = getattr(search_alg, "total_samples", 0) or 0
        if search_alg.is_finished():
            return 0
        return max(0, total - len(tune_controller.get_trials())) if total else 1

    def _slot_wanted(self, tune_controller) -> bool:
        waiting = sum(t.status == Trial.PENDING for t in tune_controller.get_trials())
        running = sum(t.status == Trial.RUNNING for t in tune_controller.get_trials())
        return (waiting + len(self.to_resume) + self._to_come(tune_controller)) > 0 and \
            running >= self.gate.max_concurrent

    def _decide(self, tune_controller, current: str | None) -> set[str]:
        """Judge every rung that is complete (lowest first); returns the trials stopped.

        All bookkeeping is done before Tune is told to stop anyone: stopping a trial calls
        back into this scheduler (on_trial_complete), which must see the verdict already."""
        if self._deciding:
            return set()
        self._deciding = True
        stopped: list[str] = []
        try:
            for tid, trial in self.trials.items():
                if trial.status in (Trial.ERROR, Trial.TERMINATED) and tid != current:
                    self.out.add(tid)
            for lvl in range(len(self.rungs)):
                at_level = [t for t, v in self.level.items() if v == lvl and t not in self.out]
                if not at_level:
                    continue
                if any(t not in self.scores[lvl] for t in at_level) or (lvl == 0 and self._to_come(tune_controller)):
                    break
                if any(v < lvl and t not in self.out for t, v in self.level.items()):
                    break
                # A trial that trained on past the rung (nobody needed its slot) and has finished
                # still takes its place in the ranking: the rung keeps 1/factor of all its trials.
                finished = [t for t, v in self.level.items() if v == lvl and t in self.out and t in self.scores[lvl]
                            and self.trials[t].status == Trial.TERMINATED and t not in self.stopped_by_rule]
                ranked = sorted(at_level + finished, key=lambda t: self.scores[lvl][t])
                keep = max(1, math.ceil(len(ranked) / self.reduction_factor))
                dropped = [t for t in ranked[keep:] if t in at_level]
                for tid in dropped:
                    self.out.add(tid)
                    self.stopped_by_rule.add(tid)
                    stopped.append(tid)
                for tid in ranked[:keep]:
                    self.level[tid] = lvl + 1
                    t, loss = self.last[tid]
                    if lvl + 1 < len(self.rungs) and t >= self.rungs[lvl + 1]:
                        self.scores[lvl + 1].setdefault(tid, loss)  # it trained on while it waited
                    if tid in finished:
                        continue
                    self._allow(tid)
                    if self.trials[tid].status == Trial.PAUSED:
                        self.to_resume.append(tid)
                self.num_stopped += len(dropped)
                if self.log is not None:
                    self.log(f"raycpt tune: rung at step {self.rungs[lvl]}: {keep} of {len(ranked)} trials go on "
                             f"({', '.join(ranked[:keep])}); stopping {', '.join(dropped) or 'none'}")
        finally:
            self._deciding = False
        for tid in stopped:
            if tid != current:
                tune_controller.stop_trial(self.trials[tid])
        return set(stopped)

    def _allow(self, tid: str) -> None:
        """Let a trial train up to the next rung after its latest result (to its budget past the
        last rung), but not past the rung after the one it has yet to pass: the steps beyond are
        lost if that verdict stops it. The workers, waiting at a rung, read this within a poll."""
        if self.allowances_uri is None or tid not in self.last:
            return
        step = self.last[tid][0]
        train_to = next((r for r in self.rungs if r > step), None)
        lvl = self.level.get(tid, 0)
        if lvl + 1 < len(self.rungs) and (train_to is None or train_to > self.rungs[lvl + 1]):
            train_to = self.rungs[lvl + 1]
        if tid in self.allowed and (self.allowed[tid] is None or self.allowed[tid] == train_to):
            return
        write_allowance(allowance_uri(self.allowances_uri, tid), train_to)
        self.allowed[tid] = train_to

    def _remove(self, tune_controller, trial: Trial) -> None:
        self.gate.controller = tune_controller
        tid = trial.trial_id
        self.out.add(tid)
        if tid in self.to_resume:
            self.to_resume.remove(tid)
        self._decide(tune_controller, current=None)


def choose_kind(kind: str, concurrent: int, num_trials: int, reduction_factor: float,
                async_min_concurrent: int) -> str:
    """`auto`: synchronous successive halving unless many trials run at once *and* the sweep has
    several times more trials than run at once; then ASHA (see docs/deploying.md, Sweeps)."""
    if kind != "auto":
        return kind
    many = concurrent >= async_min_concurrent and num_trials >= reduction_factor * concurrent
    return "asha" if many else "hyperband"
