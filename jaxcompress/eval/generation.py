"""Batched generation for evaluation tasks (GSM8K, HumanEval, long context, MT-Bench, the
lm-eval adapter), on top of `jaxcompress.models.generate`.

Prompts are sorted by length and cut into batches within a token budget; each batch is padded
to a length from a coarse ladder (`length_bucket`) and to a fixed number of rows, so that one
compiled program serves every batch of a length bucket: compilation, not decoding, is what a
small model's generation tasks mostly wait for on a GPU. Stop strings cut the decoded text at
their first occurrence (lm-eval's `until`); decoding itself stops early only at stop tokens.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import UserError
from jaxcompress.eval.scoring import bucket, default_batch_tokens, rows_for
from jaxcompress.models.generate import SamplingConfig, _bucket, _compiled_generate, left_pad, stop_token_ids


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


def length_bucket(n: int) -> int:
    """Padded prompt length for generation: a multiple of 64 up to 256, then the next value of
    the ladder 2^k, 1.5 * 2^k (at most 50% padding, two programs per octave)."""
    if n <= 256:
        return _bucket(n)
    p = 1 << (int(n) - 1).bit_length()  # next power of two >= n
    return p * 3 // 4 if n <= p * 3 // 4 else p


def generate_batched(loaded, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     stop: Sequence[str] | None = None, seed: int = 0, batch_tokens: int | None = None,
                     min_length: int = 0, desc: str | None = None, progress: bool = True) -> list[str]:
    """Completions (decoded, cut at stop strings) of token-id prompts, in order.

    Prompts are sorted by length (longest first) and cut into batches of a fixed row count per
    padded length (`length_bucket` of the batch's longest prompt), so that a task compiles one
    program per bucket. Rows: a power of two within `batch_tokens` (prompt + new tokens per
    row), but no more than the prompts need. `min_length` pads every batch to at least that
    many prompt tokens: a task that passes its longest prompt compiles one program in all.

    Sampling is reproducible: batch b uses seed `seed + b`, and batches depend only on the
    prompts given (callers that resume in chunks pass a seed derived from the chunk).
    """
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    if tok is None:
        raise UserError(f"{loaded.spec}: this model has no tokenizer; generation tasks need one")
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}")
    budget = batch_tokens or default_generation_tokens()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    room = loaded.config.max_position_embeddings
    for i in order[:1]:
        if len(prompts[i]) + max_new_tokens > room:
            raise UserError(f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={max_new_tokens} "
                            f"that is more than the model's context of {room} tokens")
    stop_ids = stop_token_ids(loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)
    graphdef, state = nnx.split(loaded.model)
    cache_dtype = jnp.dtype(loaded.model.dtype)
    texts: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc or "generate", unit="seq", disable=not progress, leave=False)
    start, batch_index = 0, 0
    while start < len(order):
        length = length_bucket(max(len(prompts[order[start]]), min_length))
        # Rows depend on the bucket and the number of prompts only, not on what is left: the last
        # batch of a call reuses its bucket's program.
        rows = min(rows_for(length + _bucket(max_new_tokens), budget), bucket(len(order)))
        idx = order[start:start + rows]
        start += len(idx)
        batch = [list(prompts[i]) for i in idx]
        batch += [batch[-1]] * (rows - len(batch))  # a fixed row count: one program per bucket
        tokens, positions = left_pad(batch, length, pad_id)
        fn = _compiled_generate(graphdef, tuple(stop_ids), sampling, loaded.kv_codec,
                                length + _bucket(max_new_tokens), cache_dtype)
        out, steps = fn(state, jnp.asarray(tokens), jnp.asarray(positions), jax.random.key(seed + batch_index))
        out = np.asarray(out)[:, :int(steps)]
        for i, row in zip(idx, out.tolist()):
            for j, t in enumerate(row):
                if t in stop_ids:
                    row = row[:j]
                    break
            texts[i] = cut_at_stop(tok.decode(row, skip_special_tokens=True), stop)
        bar.update(len(idx))
        batch_index += 1
    bar.close()
    return texts  # type: ignore[return-value]
