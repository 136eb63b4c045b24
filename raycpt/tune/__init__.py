"""`raycpt tune`: Ray Tune sweeps of continued-pretraining hyperparameters.

config.py     the `tune:` section of a job YAML (search space, budget, scheduler, objective)
objective.py  the number a sweep minimises, and the Pareto front of adaptation vs forgetting
trial.py      one trial: a normal raycpt training run (Ray Train inside a Tune trial)
sweep.py      the driver: start or continue a sweep, write its results
results.py    the results table, best-config YAML and `raycpt status SWEEP`
"""
