"""Perplexity with the protocol published GPTQ / AWQ / SparseGPT numbers use.

WikiText-2: rows joined with "\n\n", tokenized once, non-overlapping windows of `seqlen`
tokens, remainder dropped; ppl = exp(total NLL / predicted tokens). C4: " ".join of the first
1,100 documents of our C4 validation subset, at most 256 windows. See ../shared/data/README.md.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.data.paths import data_path
from jaxcompress.errors import UserError
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.models.cache import KVCache
from jaxcompress.models.functional import jit_apply

C4_DOCUMENTS = 1100
C4_MAX_WINDOWS = 256


def wikitext2_rows(split: str = "test", data_dir: str | None = None) -> list[str]:
    """The HF `wikitext-2-raw-v1` rows, rebuilt from the raw file (see the data README)."""
    name = {"test": "wiki.test.raw", "train": "wiki.train.subset.txt"}[split]
    with open(data_path("wikitext2", name, data_dir=data_dir), encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the file ends with a newline, not with an extra row
    return [line + "\n" if line.strip() else "" for line in lines]


def wikitext2_text(split: str = "test", data_dir: str | None = None) -> str:
    return "\n\n".join(wikitext2_rows(split, data_dir))


def c4_text(data_dir: str | None = None, documents: int = C4_DOCUMENTS) -> str:
    texts = []
    with open(data_path("c4", "c4_validation_2k.jsonl", data_dir=data_dir), encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == documents:
                break
    return " ".join(texts)


def tokenize(tokenizer, text: str) -> np.ndarray:
    if tokenizer is None:
        raise UserError("this model has no tokenizer (random weights?); perplexity needs one")
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)


def wikitext2_tokens(tokenizer, split: str = "test", data_dir: str | None = None) -> np.ndarray:
    return tokenize(tokenizer, wikitext2_text(split, data_dir))


def c4_tokens(tokenizer, data_dir: str | None = None) -> np.ndarray:
    return tokenize(tokenizer, c4_text(data_dir))


def windows(tokens: np.ndarray, seqlen: int, limit: int | None = None) -> np.ndarray:
    """[n, seqlen] non-overlapping windows, remainder dropped, first `limit` only."""
    n = len(tokens) // seqlen
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit={limit}: the number of windows must be at least 1 (None: all)")
        n = min(n, limit)
    if n == 0:
        raise UserError(f"text of {len(tokens)} tokens is shorter than one window of seqlen={seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)


def _window_nll(model, tokens, codec):
    """Summed NLL of each window's next-token predictions: [B]."""
    cache = None
    if codec is not None:
        cache = KVCache.create(model.config, tokens.shape[0], tokens.shape[1], model.dtype, codec)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions, cache)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -target.sum(axis=1)


def perplexity(loaded, tokens: np.ndarray, seqlen: int = 2048, limit: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    win = windows(tokens, seqlen, limit)
    nll_fn = jit_apply(loaded.model, lambda m, t: _window_nll(m, t, loaded.kv_codec))
    total = 0.0
    for start in tqdm(range(0, len(win), batch_size), desc=f"ppl seqlen={seqlen}", disable=not progress,
                      unit="batch"):
        batch = win[start:start + batch_size]
        real = len(batch)
        if real < batch_size:  # pad to one compiled shape; padded rows are discarded
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        total += float(np.asarray(nll_fn(jnp.asarray(batch)), dtype=np.float64)[:real].sum())
    predicted = len(win) * (seqlen - 1)
    return {"ppl": math.exp(total / predicted), "nll": total / predicted, "windows": len(win),
            "tokens": int(win.size), "predicted_tokens": predicted, "seqlen": seqlen}


@register_task("wikitext2")
def wikitext2_task(loaded, opts: TaskOptions) -> dict:
    tokens = wikitext2_tokens(loaded.tokenizer, "test", opts.data_dir)
    result = perplexity(loaded, tokens, opts.seqlen, opts.limit, opts.batch_size)
    return {"n": result["windows"], **result}


@register_task("c4")
def c4_task(loaded, opts: TaskOptions) -> dict:
    tokens = c4_tokens(loaded.tokenizer, opts.data_dir)
    limit = C4_MAX_WINDOWS if opts.limit is None else min(opts.limit, C4_MAX_WINDOWS)
    result = perplexity(loaded, tokens, opts.seqlen, limit, opts.batch_size)
    return {"n": result["windows"], **result}
