"""Build a sentence-cloze multiple-choice task from plain documents (no network, no labels needed).

Each item's context is one or two consecutive sentences of a prose paragraph; the right choice is
the sentence that really follows, the others are sentences of similar length from *other*
documents. A model scores above chance when it can tell which sentence continues the passage
(topic, discourse, reference), the kind of knowledge continued pretraining can erode.

What it measures is bounded by its text: built from a corpus the job replays, it checks retention
of replayed text; built from text the job never sees, it is a probe of general English.

    python -m raycpt.evals.cloze --output jobs/tasks/pydoc-cloze.jsonl   # from pydoc_data.topics
"""

from __future__ import annotations

import argparse
import json
import random
import re

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def prose_sentences(document: str) -> list[list[str]]:
    """Paragraphs of prose (no code blocks, tables or headings), each a list of sentences."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", document):
        lines = block.splitlines()
        markup = (">>>", "*", "+", "|", "=", "-")
        if not lines or any(ln.startswith("   ") or ln.strip().startswith(markup) for ln in lines):
            continue  # indented code, prompts, lists, tables, heading underlines
        text = " ".join(ln.strip() for ln in lines)
        if "::" in text or len(text) < 80:
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(text)]
        sentences = [s for s in sentences if 30 <= len(s) <= 220 and s[-1] in ".!?"]
        if len(sentences) >= 2:
            paragraphs.append(sentences)
    return paragraphs


def build_items(documents: dict[str, str], n_items: int, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Up to `n_items` items {context, choices, gold, source}; deterministic for a seed."""
    rng = random.Random(seed)
    pool: list[tuple[str, str]] = []            # (document, sentence) for distractors
    candidates: list[tuple[str, str, str]] = []  # (document, context, true next sentence)
    for name in sorted(documents):
        for para in prose_sentences(documents[name]):
            pool.extend((name, s) for s in para)
            for k in range(1, len(para)):
                candidates.append((name, " ".join(para[max(0, k - 2):k]), para[k]))
    rng.shuffle(candidates)
    items = []
    for name, context, truth in candidates:
        # Distractors of about the same length, so length alone does not give the answer away.
        similar = [s for d, s in pool if d != name and 0.75 <= len(s) / len(truth) <= 1.33 and s != truth]
        if len(similar) < n_choices - 1:
            continue
        choices = rng.sample(similar, n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, truth)
        items.append({"context": context, "choices": [" " + c for c in choices], "gold": gold, "source": name})
        if len(items) >= n_items:
            break
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import pydoc_data.topics

    items = build_items(dict(pydoc_data.topics.topics), a.items, a.choices, a.seed)
    with open(a.output, "w") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    print(f"{len(items)} items -> {a.output}")


if __name__ == "__main__":
    main()
