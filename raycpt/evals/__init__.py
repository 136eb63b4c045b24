"""Evaluation beyond held-out loss: multiple-choice tasks and `raycpt eval` on any model.

tasks.py       multiple-choice items (jsonl), their tokenization and log-likelihood scoring
standalone.py  `raycpt eval RUN|CHECKPOINT|HF_DIR`: probes and tasks in one process
"""
