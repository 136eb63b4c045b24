"""Everything about a job that can be checked on the driver, before Ray or any worker starts.

A bad input found here fails `raycpt train` in a second or two with the key to fix, instead of a
minute later inside the workers (and then again at each of Ray Train's retries):

- storage: the run folder's and every source's bucket answers (short timeouts, no long retries);
- every source path: exists, is a folder, holds a manifest with the fields training reads;
- the model folder: config.json parses, tokenizer files present, every safetensors file opens;
- the start decision: the newest committed checkpoint's train state parses, its DCP metadata
  loads through the restricted unpickler and no shard is truncated (else the previous committed
  one is used, logged); a resume with a changed resume-critical config is refused;
- the data fits the model: seq_len, tokenizer, vocab (every shard footer), and the eval rows.

On a cluster the model folder may exist on the worker nodes only (a shared volume the driver's
pod does not mount): the model checks then run in the workers, as before.
"""

from __future__ import annotations

import os
from typing import Callable

from raycpt import storage
from raycpt.config import JobConfig


def check_job(job: JobConfig, joins_cluster: bool, log: Callable[[str], None] = print,
              reads_weights: bool = True) -> str:
    """Raise a RaycptError naming the key and the fix for the first kind of problem found; return
    the start decision's message. `reads_weights=False`: the run builds random weights of the
    base's architecture (`raycpt bench train`), so the folder needs no safetensors."""
    # Each check imports what it needs when it runs: the cheap ones (sources, manifests) answer
    # before torch and the checkpoint code are loaded, so a typo in a path fails in a second.
    from raycpt.data.stream import read_manifests

    storage.check_reachable(job.run.storage, "run.storage")
    for i, src in enumerate(job.data.sources):
        storage.check_reachable(src.path, f"data.sources[{i}].path")
    manifests = read_manifests(job)  # each path: exists, a folder, a complete manifest
    model_here = bool(job.model.base) and (os.path.exists(job.model.base) or not joins_cluster)
    if model_here:
        from raycpt.model.hf import check_model_folder

        check_model_folder(job.model.base, weights=reads_weights)
    from raycpt.checkpoint.resume import check_resume_config, decide_start

    decision = decide_start(job)
    if decision.kind == "resume":
        check_resume_config(decision.train_state.config, job)
    if model_here:
        from raycpt.data.manifest import tokenizer_identity
        from raycpt.data.verify import check_data_fits_model
        from raycpt.model.hf import load_config, load_tokenizer

        config = load_config(job.model.base)
        tok_id = tokenizer_identity(load_tokenizer(job.model.base), os.path.basename(job.model.base))
        check_data_fits_model(job, manifests, tok_id, config.vocab_size, read_footers=True)
        check_eval_rows(job, manifests, config.vocab_size)
    elif job.model.base:
        log(f"preflight: model.base {job.model.base} is not on this machine; the workers check it")
    return decision.message


def check_eval_rows(job: JobConfig, manifests, vocab_size: int) -> None:
    from raycpt.data.manifest import DataError
    from raycpt.data.verify import eval_row_problems

    problems = []
    for i, m in enumerate(manifests):
        problems += eval_row_problems(m, f"data.sources[{i}].path", vocab_size, job.eval.max_rows)
    if problems:
        raise DataError("the eval data does not fit the model:\n  " + "\n  ".join(problems))
