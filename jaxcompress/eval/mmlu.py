"""MMLU: 57 subjects, 5-shot from the dev split, lm-evaluation-harness' prompt.

    The following are multiple choice questions (with answers) about {subject}.

    {dev question}
    A. ...
    B. ...
    C. ...
    D. ...
    Answer: B

    ... (5 dev examples) ...

    {test question}
    ...
    Answer:

The choices are scored as the continuations " A", " B", " C", " D" (one forward pass of the
prompt serves all four: the scorer's shared-context path). Reported: accuracy per subject,
`acc` over all questions (lm-eval's size-weighted group average) and `acc_macro` (the mean of
the subject accuracies). `--limit N` takes the first N questions of each subject;
`--task-opt subjects=[anatomy,virology]` evaluates only those subjects.
"""

from __future__ import annotations

import csv
import os

from jaxcompress.data.paths import data_path
from jaxcompress.errors import UserError
from jaxcompress.eval.metrics import summarize
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.zeroshot import MCItem, score_items

LETTERS = "ABCD"
NUM_FEWSHOT = 5


def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if set(r) != {"question", "choice0", "choice1", "choice2", "choice3", "answer"}:
            raise UserError(f"{path}: expected columns question,choice0..choice3,answer, got {sorted(r)}")
    return rows


def subjects(data_dir=None) -> list[str]:
    folder = data_path("mmlu", "test", data_dir=data_dir)
    return sorted(f[: -len("_test.csv")] for f in os.listdir(folder) if f.endswith("_test.csv"))


def format_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{LETTERS[i]}. {row[f'choice{i}']}" for i in range(4)]
    return "\n".join(lines) + "\nAnswer:"


def fewshot_prefix(subject: str, dev: list[dict], k: int = NUM_FEWSHOT) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    shots = "".join(f"{format_question(r)} {LETTERS[int(r['answer'])]}\n\n" for r in dev[:k])
    return header + shots


def subject_items(subject: str, data_dir=None, k: int = NUM_FEWSHOT, limit: int | None = None) -> list[MCItem]:
    dev = read_csv(data_path("mmlu", "dev", f"{subject}_dev.csv", data_dir=data_dir))
    test = read_csv(data_path("mmlu", "test", f"{subject}_test.csv", data_dir=data_dir))
    prefix = fewshot_prefix(subject, dev, k)
    test = test if limit is None else test[:limit]
    return [MCItem((prefix + format_question(r),), tuple(" " + c for c in LETTERS), tuple(LETTERS),
                   int(r["answer"])) for r in test]


@register_task("mmlu")
def mmlu_task(loaded, opts: TaskOptions) -> dict:
    k = int(opts.extra.get("num_fewshot", NUM_FEWSHOT))
    names = subjects(opts.data_dir)
    chosen = opts.extra.get("subjects")
    if chosen:
        chosen = [chosen] if isinstance(chosen, str) else list(chosen)
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise UserError(f"mmlu: unknown subjects {unknown}; the data has {', '.join(names)}")
        names = [n for n in names if n in chosen]
    items, owner = [], []
    for s in names:
        its = subject_items(s, opts.data_dir, k, opts.limit)
        items.extend(its)
        owner.extend([s] * len(its))
    per_item = score_items(loaded, items, opts, "mmlu")
    per_subject = {}
    for s in names:
        rows = [p for p, o in zip(per_item, owner) if o == s]
        per_subject[s] = {"n": len(rows), "acc": sum(r["acc"] for r in rows) / len(rows)}
    out = summarize(per_item, ["acc"])
    out["acc_macro"] = sum(v["acc"] for v in per_subject.values()) / len(per_subject)
    out["num_fewshot"] = k
    out["subjects"] = per_subject
    return out
