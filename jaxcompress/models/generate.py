"""Batched generation: left-padded prefill, then a jitted on-device decode loop.

Prompts of a batch are left-padded to a common length (padding gets position -1 and is never
attended), so every row writes its next token at the same cache slot. The decode loop is one
`lax.while_loop` inside one jitted function: no host round trip per token, and the weights are
loop invariants (never copied per step). Shapes are bucketed so that few programs compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress.errors import UserError
from jaxcompress.models.cache import KVCache
from jaxcompress.models.sampling import sample


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def _bucket(n: int, step: int = 64) -> int:
    return max(step, -(-n // step) * step)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, length] and positions [B, length] (-1 on padding)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty; generation needs at least one token")
        tokens[i, length - len(p):] = p
        positions[i, length - len(p):] = np.arange(len(p))
    return tokens, positions


def prefill(model, tokens, positions, cache: KVCache):
    """Writes the prompt into the cache; returns last-position logits [B, V] and the cache."""
    logits, cache = model(tokens, positions, cache)
    return logits[:, -1], cache


def decode_loop(model, first_logits, cache: KVCache, next_pos, rng, stop_ids: tuple[int, ...],
                sampling: SamplingConfig, return_cache: bool = False):
    """Samples up to `max_new_tokens` tokens per row; rows stop at a stop id.

    Returns tokens [B, max_new_tokens] (after a row stops, it repeats its stop token) and the
    number of steps run (and, with `return_cache`, the cache after them).
    """
    b = first_logits.shape[0]
    n = sampling.max_new_tokens
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def pick(logits, key):
        return sample(logits, key, sampling.temperature, sampling.top_k, sampling.top_p)

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, out, logits, cache, done, pos, key = carry
        key, sub = jax.random.split(key)
        token = pick(logits, sub)
        prev = out[:, jnp.maximum(step - 1, 0)]
        token = jnp.where(done, prev, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        new_logits, cache = model(token[:, None], pos[:, None], cache)
        return step + 1, out, new_logits[:, -1], cache, done, pos + 1, key

    init = (jnp.int32(0), jnp.zeros((b, n), jnp.int32), first_logits, cache,
            jnp.zeros((b,), bool), next_pos, rng)
    step, out, _, cache, _, _, _ = jax.lax.while_loop(cond, body, init)
    return (out, step, cache) if return_cache else (out, step)


@functools.lru_cache(maxsize=16)
def _compiled_generate(graphdef, stop_ids, sampling, codec, cache_len, cache_dtype):
    def run(state, tokens, positions, rng):
        model = nnx.merge(graphdef, state)
        cache = KVCache.create(model.config, tokens.shape[0], cache_len, cache_dtype, codec)
        logits, cache = prefill(model, tokens, positions, cache)
        next_pos = jnp.max(positions, axis=1) + 1
        return decode_loop(model, logits, cache, next_pos, rng, stop_ids, sampling)

    return jax.jit(run)


def generate_tokens(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
                    stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0, codec=None,
                    cache_dtype=None) -> list[list[int]]:
    """Generates continuations (token ids, stop token included, nothing after it)."""
    if sampling.max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be positive, got {sampling.max_new_tokens}")
    length = _bucket(max(len(p) for p in prompts))
    cache_len = length + _bucket(sampling.max_new_tokens)
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts) + sampling.max_new_tokens
    if longest > limit:
        raise UserError(f"prompt plus max_new_tokens is {longest} tokens, more than the model's "
                        f"context of {limit} (max_position_embeddings)")
    tokens, positions = left_pad(prompts, length, pad_id)
    graphdef, state = nnx.split(model)
    fn = _compiled_generate(graphdef, tuple(stop_ids), sampling, codec, cache_len,
                            jnp.dtype(cache_dtype or model.dtype))
    out, steps = fn(state, jnp.asarray(tokens), jnp.asarray(positions), jax.random.key(seed))
    out = np.asarray(out)[:, : int(steps)]
    results = []
    for row in out:
        row = row.tolist()
        for i, t in enumerate(row):
            if t in stop_ids:
                row = row[: i + 1]
                break
        results.append(row)
    return results


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat was given but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def stop_token_ids(loaded) -> tuple[int, ...]:
    ids = set(loaded.config.eos_token_ids)
    tok = loaded.tokenizer
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        for special in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tok.convert_tokens_to_ids(special) if special in tok.get_vocab() else None
            if tid is not None:
                ids.add(tid)
    return tuple(sorted(ids))


def generate(loaded, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] | None = None,
             chat: bool = False, seed: int = 0) -> list[str]:
    """Text in, text out. `prompts` may also be lists of token ids. `stop` strings cut the
    decoded text (after generation); stop tokens (EOS, end-of-turn) end a row early."""
    tok = loaded.tokenizer
    if tok is None:
        raise UserError("this model has no tokenizer; pass token ids to generate_tokens instead")
    ids = [list(p) if not isinstance(p, str) else encode_prompt(tok, p, chat) for p in prompts]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stop_ids = stop_token_ids(loaded)
    outs = generate_tokens(loaded.model, ids, SamplingConfig(max_new_tokens, temperature, top_k, top_p),
                           stop_ids=stop_ids, pad_id=pad_id, seed=seed, codec=loaded.kv_codec)
    texts = []
    for row in outs:
        if row and row[-1] in stop_ids:
            row = row[:-1]
        text = tok.decode(row, skip_special_tokens=True)
        for s in stop or ():
            if s and s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts
