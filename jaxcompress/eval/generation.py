"""Batched generation for evaluation tasks (GSM8K, HumanEval, long context, MT-Bench, the
lm-eval adapter), on top of `jaxcompress.models.generate`.

Prompts are sorted by length and cut into batches within a token budget; each batch is padded
to a fixed number of rows so that one compiled program serves every batch of a length bucket.
Stop strings cut the decoded text at their first occurrence (lm-eval's `until`).
"""

from __future__ import annotations

from typing import Sequence

import jax

from jaxcompress.errors import UserError
from jaxcompress.eval.scoring import default_batch_tokens, rows_for
from jaxcompress.models.generate import SamplingConfig, _bucket, generate_tokens, stop_token_ids


def default_generation_tokens() -> int:
    """Prompt + new tokens per generation batch: decoding is memory-bound, so bigger batches
    than for scoring pay off (the prefill's [B, T, V] logits set the limit)."""
    return 4 * default_batch_tokens() if jax.default_backend() != "cpu" else default_batch_tokens()


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("this task uses the chat template, but the tokenizer has none")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """The text up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop or ():
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def generate_batched(loaded, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     stop: Sequence[str] | None = None, seed: int = 0, batch_tokens: int | None = None,
                     desc: str | None = None, progress: bool = True) -> list[str]:
    """Completions (decoded, cut at stop strings) of token-id prompts, in order.

    Sampling is reproducible: batch b uses seed `seed + b`, and batches depend only on the
    prompts given (callers that resume in chunks pass a seed derived from the chunk).
    """
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    if tok is None:
        raise UserError(f"{loaded.spec}: this model has no tokenizer; generation tasks need one")
    budget = batch_tokens or default_generation_tokens()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stop_ids = stop_token_ids(loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
    texts: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc or "generate", unit="seq", disable=not progress, leave=False)
    start, batch_index = 0, 0
    while start < len(order):
        length = _bucket(len(prompts[order[start]]))
        rows = rows_for(length + _bucket(max_new_tokens), budget)
        idx = [i for i in order[start:start + rows] if _bucket(len(prompts[i])) == length]
        start += len(idx)
        batch = [list(prompts[i]) for i in idx]
        batch += [batch[-1]] * (rows - len(batch))  # a fixed row count: one program per bucket
        outs = generate_tokens(loaded.model, batch, sampling, stop_ids=stop_ids, pad_id=pad_id,
                               seed=seed + batch_index, codec=loaded.kv_codec)
        for i, row in zip(idx, outs):
            if row and row[-1] in stop_ids:
                row = row[:-1]
            texts[i] = cut_at_stop(tok.decode(row, skip_special_tokens=True), stop)
        bar.update(len(idx))
        batch_index += 1
    bar.close()
    return texts  # type: ignore[return-value]
