"""Zero-shot log-likelihood tasks, scored as lm-evaluation-harness scores them.

Each item becomes (context, " " + choice) requests (" " is the target delimiter); `acc` takes
the choice with the highest log-likelihood, `acc_norm` the highest per character of the choice.
The prompts rebuild lm-eval's `doc_to_text` from the local files (../shared/data/zeroshot):

  hellaswag     "{activity}: {ctx}" (preprocessed in the file)        4 endings
  arc_easy/arc_challenge  "Question: {q}\\nAnswer:"                     3-5 answers
  piqa          "Question: {goal}\\nAnswer:"                            2 solutions
  boolq         "{passage}\\nQuestion: {question}?\\nAnswer:"           no / yes
  siqa          the file's letter-choice prompt ("...\\nAnswer:")       A / B (the file has two)
  openbookqa    "{question_stem}"                                      4 answers
  copa          "{premise without '.'} because|therefore"              2 alternatives, lowercased
  winogrande    partial scoring: the sentence up to each option is the context, the rest of
                the sentence the continuation; acc only
  lambada_openai  context -> " " + last word; acc (greedy) and perplexity
"""

from __future__ import annotations

import dataclasses
import json
import math

from jaxcompress.data.paths import data_path
from jaxcompress.eval.metrics import mean_stderr, multiple_choice, summarize
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.runner import map_chunks
from jaxcompress.eval.scoring import scorer_for

CHUNK_ITEMS = 2048  # items per resumable chunk


@dataclasses.dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: a context per choice (or one shared), continuations, the
    choice texts that acc_norm measures, and the gold index."""
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        contexts = self.contexts * len(self.continuations) if len(self.contexts) == 1 else self.contexts
        return list(zip(contexts, self.continuations))


def choice_item(context: str, choices, gold: int, delimiter: str = " ") -> MCItem:
    return MCItem((context,), tuple(delimiter + c for c in choices), tuple(choices), int(gold))


def _jsonl(*parts: str, data_dir=None) -> list[dict]:
    with open(data_path(*parts, data_dir=data_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------- documents
def hellaswag_items(data_dir=None) -> list[MCItem]:
    with open(data_path("hellaswag", "hellaswag_val.txt", data_dir=data_dir), encoding="utf-8") as f:
        lines = f.read().split("\n")
    items = []
    for i in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        items.append(choice_item(ctx, endings, gold))
    return items


def _query_items(name: str, to_context, data_dir=None) -> list[MCItem]:
    return [choice_item(to_context(d["query"]), d["choices"], d["gold"])
            for d in _jsonl("zeroshot", name, data_dir=data_dir)]


def _boolq_context(query: str) -> str:
    prefix = "Passage: "
    return (query[len(prefix):] if query.startswith(prefix) else query) + "\nAnswer:"


DOCS = {
    "hellaswag": hellaswag_items,
    "arc_easy": lambda d=None: _query_items("arc_easy.jsonl", lambda q: q + "\nAnswer:", d),
    "arc_challenge": lambda d=None: _query_items("arc_challenge.jsonl", lambda q: q + "\nAnswer:", d),
    "piqa": lambda d=None: _query_items("piqa.jsonl", lambda q: q + "Answer:", d),
    "boolq": lambda d=None: _query_items("boolq.jsonl", _boolq_context, d),
    "siqa": lambda d=None: _query_items("siqa.jsonl", lambda q: q, d),
    "openbookqa": lambda d=None: _query_items("openbook_qa.jsonl", lambda q: q, d),
    "copa": lambda d=None: _query_items("copa.jsonl", lambda q: q, d),
    "winogrande": lambda d=None: [
        MCItem(tuple(doc["context_options"]), (" " + doc["continuation"],) * len(doc["context_options"]),
               (doc["continuation"],) * len(doc["context_options"]), int(doc["gold"]))
        for doc in _jsonl("zeroshot", "winogrande.jsonl", data_dir=d)],
}
# Tasks whose lm-eval configs report acc only (winogrande's choices share one continuation;
# the others' choices are labels or short alternatives).
ACC_ONLY = {"winogrande", "boolq", "copa", "siqa"}


def limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ------------------------------------------------------------------------------------- scoring
def score_items(loaded, items: list[MCItem], opts: TaskOptions, name: str) -> list[dict]:
    """Per item: log-likelihood of each choice, acc and acc_norm (resumable in chunks)."""
    scorer = scorer_for(loaded, opts)

    def run(chunk, start):
        requests, owner = [], []
        for j, item in enumerate(chunk):
            for r in item.requests():
                requests.append(r)
                owner.append(j)
        scores = scorer.loglikelihood(requests, desc=f"{name} {start + len(chunk)}/{len(items)}")
        lls: list[list[float]] = [[] for _ in chunk]
        for j, (lp, _) in zip(owner, scores):
            lls[j].append(lp)
        return [{"lls": ll, **multiple_choice(ll, item.choices, item.gold)} for ll, item in zip(lls, chunk)]

    return map_chunks(name, items, run, int(opts.extra.get("chunk_size", CHUNK_ITEMS)))


def multiple_choice_task(name: str):
    def task(loaded, opts: TaskOptions) -> dict:
        items = limited(DOCS[name](opts.data_dir), opts.limit)
        per_item = score_items(loaded, items, opts, name)
        return summarize(per_item, ["acc"] if name in ACC_ONLY else ["acc", "acc_norm"])

    task.__name__ = f"{name}_task"
    return register_task(name)(task)


for _name in DOCS:
    multiple_choice_task(_name)


# ---------------------------------------------------------------------------------- LAMBADA
def lambada_requests(data_dir=None) -> list[tuple[str, str]]:
    return [(d["context"], " " + d["continuation"]) for d in _jsonl("zeroshot", "lambada_openai.jsonl",
                                                                    data_dir=data_dir)]


@register_task("lambada_openai")
def lambada_task(loaded, opts: TaskOptions) -> dict:
    """Last-word accuracy (greedy) and perplexity = exp(-mean log-likelihood of the word)."""
    requests = limited(lambada_requests(opts.data_dir), opts.limit)
    scorer = scorer_for(loaded, opts)

    def run(chunk, start):
        return [{"ll": lp, "acc": float(greedy)}
                for lp, greedy in scorer.loglikelihood(chunk, desc=f"lambada {start + len(chunk)}/{len(requests)}")]

    per_item = map_chunks("lambada_openai", requests, run, int(opts.extra.get("chunk_size", CHUNK_ITEMS)))
    out = summarize(per_item, ["acc"])
    mean_ll, _ = mean_stderr([p["ll"] for p in per_item])
    out["ppl"] = math.exp(-mean_ll)
    return out
