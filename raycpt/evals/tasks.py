"""Multiple-choice tasks scored by log-likelihood, the way lm-eval-harness scores HellaSwag/ARC.

A task file is JSON lines, one item per line:

    {"context": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "gold": 0}

Each choice is a continuation of the context; its score is the summed log-probability of the
continuation's tokens given the context (`loglikelihood` requests of the harness). The item is
right when the gold choice scores highest (`acc`), or highest after dividing each score by the
choice's length in characters (`acc_norm`, the harness's length normalisation, which removes
the bias toward short choices).

Tokenization follows the harness too: trailing whitespace of the context moves to the start of
the continuation, the continuation's tokens are those of tokenize(context + choice) after the
tokens of tokenize(context), and a request longer than `max_tokens` is cut from the left (the
start of the context goes, the continuation stays).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raycpt import storage
from raycpt.data.manifest import DataError


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Request:
    """One (item, choice) pair: the tokens of context + continuation, of which the last `n_cont`
    are the continuation being scored."""

    item: int
    choice: int
    tokens: tuple[int, ...]
    n_cont: int


def read_items(path: str, key: str, max_items: int | None = None) -> list[Item]:
    """The items of a task file; an error names the config key, the file and the line."""
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{key}: {path} does not exist "
                        "(a JSON-lines file of {context, choices, gold} items)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{key}: {path} is unreadable ({type(e).__name__}: {e})") from None
    items: list[Item] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{key}: {path}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not {"context", "choices", "gold"} <= set(d):
            raise DataError(f"{where}: an item needs the fields context, choices and gold")
        choices = d["choices"]
        if not isinstance(d["context"], str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: context must be a string and choices a list of at least 2 non-empty strings")
        gold = d["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: gold must be the index of the right choice, "
                            f"0..{len(choices) - 1} (got {gold!r})")
        items.append(Item(d["context"], tuple(choices), gold))
        if max_items is not None and len(items) >= max_items:
            break
    if not items:
        raise DataError(f"{key}: {path} holds no items")
    return items


def encode(items: list[Item], tokenizer: Any, max_tokens: int) -> list[Request]:
    """Loglikelihood requests of every choice of every item (lm-eval-harness tokenization)."""
    def tok(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    requests = []
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context, cont = item.context, choice
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, cont = context[:-n_spaces], context[-n_spaces:] + cont
            ctx_enc = tok(context) if context else [start]  # an empty context: the start-of-text token
            whole = tok(context + cont) if context else [start] + tok(cont)
            cont_enc = whole[len(ctx_enc):] or tok(cont)
            tokens = (ctx_enc + cont_enc)[-(max_tokens + 1):]
            requests.append(Request(i, j, tuple(tokens), min(len(cont_enc), len(tokens) - 1)))
    return requests


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: list[Request], rank: int, world: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Summed log-probability of each request's continuation, float64 [len(requests)].

    Requests are sorted longest first (less padding) and dealt round-robin to the ranks; every
    rank runs the same number of forward passes (FSDP all-gathers in each), with a dummy row
    where it has no request left. With a process group the result is summed over the ranks, so
    every rank holds all scores; without one it holds this rank's share (zeros elsewhere)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(requests), dtype=torch.float64, device=device)
    order = sorted(range(len(requests)), key=lambda k: (-len(requests[k].tokens), k))
    mine = order[rank::world]
    n_batches = math.ceil(math.ceil(len(requests) / world) / batch_size) if requests else 0
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        rows = [requests[k].tokens for k in chunk] or [(0, 0)]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, toks in enumerate(rows):
            x[r, :len(toks) - 1] = torch.as_tensor(toks[:-1])
        # Right padding: a causal model's logits at real positions never see the pad after them.
        logits = model(input_ids=x.to(device)).logits
        for r, k in enumerate(chunk):
            req = requests[k]
            n = len(req.tokens)
            pos = torch.arange(n - 1 - req.n_cont, n - 1, device=device)
            target = torch.as_tensor(req.tokens[n - req.n_cont:], device=device)
            logp = torch.log_softmax(logits[r, pos].double(), dim=-1)
            out[k] = logp.gather(1, target[:, None]).sum()
    if dist.is_initialized():
        dist.all_reduce(out)
    model.train(was_training)
    return out


def accuracy(items: list[Item], requests: list[Request], scores: torch.Tensor | np.ndarray) -> dict[str, float]:
    """acc and acc_norm (score / choice length in characters) over the items."""
    ll = np.asarray(torch.as_tensor(scores).cpu(), dtype=np.float64)
    by_item: dict[int, dict[int, float]] = {}
    for req, s in zip(requests, ll):
        by_item.setdefault(req.item, {})[req.choice] = float(s)
    right = right_norm = 0
    for i, item in enumerate(items):
        s = [by_item[i][j] for j in range(len(item.choices))]
        right += int(np.argmax(s)) == item.gold
        right_norm += int(np.argmax([v / max(len(c), 1) for v, c in zip(s, item.choices)])) == item.gold
    n = len(items)
    return {"acc": right / n, "acc_norm": right_norm / n, "items": n,
            "chance": float(np.mean([1 / len(it.choices) for it in items]))}


def task_problems(job) -> list[str]:
    """Format problems of the job's task files (checked on the driver before any worker starts)."""
    problems = []
    for i, t in enumerate(job.eval.tasks):
        try:
            read_items(t.path, f"eval.tasks[{i}].path", t.max_items)
        except DataError as e:
            problems.append(str(e))
    return problems
