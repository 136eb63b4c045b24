"""Held-out evaluation on known data (no Ray, no process group)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raycpt.train.evaluate import eval_losses, forgetting, perplexity

CLOZE = Path(__file__).resolve().parents[1] / "jobs" / "tasks" / "pydoc-cloze.jsonl"


def small_llama(vocab: int = 100):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def test_uniform_model_scores_log_vocab_and_its_perplexity_is_the_vocab():
    model = small_llama(100)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: every next token has probability 1/100
    rng = np.random.default_rng(0)
    rows = {"new": rng.integers(0, 100, (5, 12)), "old": rng.integers(0, 100, (3, 12))}
    losses = eval_losses(model, rows, 0, 1, 2, torch.device("cpu"))  # 5 rows in micro-batches of 2
    assert losses == pytest.approx({"new": math.log(100), "old": math.log(100)}, abs=1e-5)
    assert perplexity(losses["new"]) == pytest.approx(100, rel=1e-4)


def test_eval_is_the_token_mean_over_all_rows_whatever_the_micro_batch():
    model = small_llama(100).eval()
    rows = np.random.default_rng(1).integers(0, 100, (5, 10))
    with torch.no_grad():
        x = torch.as_tensor(rows)
        logits = model(input_ids=x).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), x[:, 1:].reshape(-1)).item()
    for micro in (1, 2, 5):
        got = eval_losses(model, {"d": rows}, 0, 1, micro, torch.device("cpu"))["d"]
        assert got == pytest.approx(expected, abs=1e-5)
    assert eval_losses(model, {"d": rows[:0]}, 0, 1, 2, torch.device("cpu")) == {}  # no held-out rows: no entry


def test_forgetting_is_old_domain_loss_now_minus_at_step_0():
    assert forgetting({"english": 3.5, "code": 2.0}, {"english": 3.0, "code": 2.5}) == \
        pytest.approx({"english": 0.5, "code": -0.5})


# ---------------------------------------------------------------------------------------------
# Multiple-choice tasks (raycpt/evals/tasks.py)


def _tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_model)


def test_mc_scores_by_hand_on_a_uniform_model(tiny_model):
    """All logits 0: every token costs log V, so a choice scores -(its tokens) x log V; acc picks
    the choice of fewest tokens, acc_norm the one of fewest tokens per character."""
    from raycpt.evals.tasks import Item, accuracy, encode, loglikelihoods

    model, tok = _tiny(tiny_model)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    items = [Item("My pet is a", (" cat", " big dog that sat down"), gold=0),
             Item("Numbers: one two", (" three four five six", " x"), gold=0)]
    reqs = encode(items, tok, max_tokens=64)
    n = [r.n_cont for r in reqs]
    assert n == [len(tok(c, add_special_tokens=False)["input_ids"]) for it in items for c in it.choices]
    assert n[0] == 1 and n[1] > 1
    ll = loglikelihoods(model, reqs, 0, 1, 3, torch.device("cpu"))
    v = model.config.vocab_size
    assert ll.tolist() == pytest.approx([-k * math.log(v) for k in n], abs=1e-6)
    # item 0 (gold " cat", 1 token): acc right; per character the long choice costs less, so acc_norm
    # is wrong. item 1 (gold the 4-word choice): " x" has fewer tokens (acc wrong) but more per
    # character (acc_norm right).
    per_char = [k / len(c) for k, c in zip(n, [c for it in items for c in it.choices])]
    assert per_char[1] < per_char[0] and per_char[2] < per_char[3]
    assert accuracy(items[:1], reqs[:2], ll[:2]) == {"acc": 1.0, "acc_norm": 0.0, "items": 1, "chance": 0.5}
    res = accuracy(items, reqs, ll)
    assert res["acc"] == 0.5 and res["acc_norm"] == 0.5 and res["items"] == 2


def test_mc_batched_sharded_scores_equal_one_forward_per_choice(tiny_model):
    from raycpt.evals.tasks import Item, encode, loglikelihoods

    model, tok = _tiny(tiny_model)
    items = [Item("The quick brown fox ", (" jumps", "runs away fast", " sleeps"), 0),
             Item("", ("Hello there", "Goodbye"), 1), Item("A long context " * 12, (" end.", " stop here now."), 0)]
    reqs = encode(items, tok, max_tokens=16)  # the long context is cut from the left
    assert all(len(r.tokens) <= 17 for r in reqs)
    # The harness's whitespace move: "fox " + "runs" is scored as "fox" + " runs...".
    assert tok.decode(reqs[1].tokens[-reqs[1].n_cont:]).startswith(" runs")
    expected = []
    with torch.no_grad():
        for r in reqs:
            x = torch.as_tensor([r.tokens])
            logp = torch.log_softmax(model(input_ids=x[:, :-1]).logits[0].double(), -1)
            cont = torch.arange(len(r.tokens) - r.n_cont, len(r.tokens))
            expected.append(float(logp[cont - 1, x[0, cont]].sum()))
    # Two "ranks" in one process: each returns its share; their sum is every score.
    parts = [loglikelihoods(model, reqs, rank, 2, 2, torch.device("cpu")) for rank in (0, 1)]
    assert (parts[0] != 0).sum() + (parts[1] != 0).sum() == len(reqs)
    assert (parts[0] + parts[1]).tolist() == pytest.approx(expected, abs=1e-4)


def test_task_file_errors_name_key_file_and_line(tmp_path):
    from raycpt.data.manifest import DataError
    from raycpt.evals.tasks import read_items

    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 1}\n'
                    '{"context": "a", "choices": [" b"], "gold": 0}\n')
    with pytest.raises(DataError, match=r"eval.tasks\[0\].path: .*t.jsonl:2: context must be a string and choices"):
        read_items(str(path), "eval.tasks[0].path")
    assert len(read_items(str(path), "k", max_items=1)) == 1
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 2}\n')
    with pytest.raises(DataError, match=r":1: gold must be the index"):
        read_items(str(path), "k")


def test_shipped_cloze_task_is_valid_and_rebuilds_the_same():
    import json
    import pydoc_data.topics

    from raycpt.evals.cloze import build_items
    from raycpt.evals.tasks import read_items

    path = CLOZE
    items = read_items(str(path), "jobs/tasks/pydoc-cloze.jsonl")
    assert len(items) == 200 and all(len(it.choices) == 4 for it in items)
    golds = [it.gold for it in items]
    assert min(golds.count(g) for g in range(4)) > 30  # the right answer is not always in one place
    rebuilt = build_items(dict(pydoc_data.topics.topics), 200)
    assert [json.dumps(r) for r in rebuilt] == path.read_text().splitlines()


# ---------------------------------------------------------------------------------------------
# The Evaluator (raycpt/train/evaluate.py), one process, a tiny model


def test_evaluator_records_forgetting_against_step_0_and_keeps_its_history(tiny_model, prepared_sources):
    from raycpt.data.manifest import read_manifest
    from raycpt.evals.tasks import read_items
    from raycpt.train.evaluate import Evaluator, read_probe_rows, report_metrics

    model, tok = _tiny(tiny_model)
    code, english = (read_manifest(prepared_sources[k]) for k in ("code", "english"))
    # A training source can serve as a probe: held-out rows first, then training rows fill up.
    rows = read_probe_rows(english, english.eval.rows + 3)
    assert len(rows) == english.eval.rows + 3
    assert (rows[:english.eval.rows] == read_probe_rows(english, english.eval.rows)).all()
    cloze = str(CLOZE)
    ev = Evaluator([("code", "new", code)], [("prose", english)], [("cloze", read_items(cloze, "k", 4))], tok,
                   max_rows=3, seq_len=64, batch_size=2, tasks_at="start_and_end", rank=0, world=1,
                   device=torch.device("cpu"))
    first = ev.evaluate(model, 0)
    assert first["probe_forgetting"] == {"prose": 0.0} and first["tasks"]["cloze"]["items"] == 4
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)  # a different model: the losses move
    mid = ev.evaluate(model, 2)
    assert "tasks" not in mid  # start_and_end: not at an intermediate evaluation
    rise = mid["probe_loss"]["prose"] - first["probe_loss"]["prose"]
    assert rise != 0 and mid["probe_forgetting"]["prose"] == pytest.approx(rise)
    assert mid["relative_forgetting"]["prose"] == pytest.approx(rise / first["probe_loss"]["prose"])
    assert mid["forgetting"] == {}  # the new domain is adaptation, not forgetting
    last = ev.evaluate(model, 4, final=True)
    assert "cloze" in last["tasks"]
    flat = report_metrics(last)
    assert flat["eval/probe_loss/prose"] == last["probe_loss"]["prose"] and "eval/task_acc_norm/cloze" in flat
    # The history is the train state's eval_history; a restored evaluator still compares with step 0.
    again = Evaluator([("code", "new", code)], [("prose", english)], [], tok, max_rows=3, seq_len=64,
                      batch_size=2, tasks_at="every_eval", rank=0, world=1, device=torch.device("cpu"))
    again.load_state_dict(ev.state_dict())
    assert again.baseline == first and [r["step"] for r in again.history] == [0, 2, 4]
    assert again.evaluate(model, 6)["probe_forgetting"]["prose"] == pytest.approx(rise, abs=1e-5)
