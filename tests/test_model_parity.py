"""Our Flax model against Hugging Face transformers on tiny random checkpoints (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxcompress.io.hf import load_hf_folder
from jaxcompress.models.cache import KVCache

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0}

CASES = {
    "llama3-gqa-untied": dict(kind="llama", num_heads=4, num_kv_heads=2, tie=False,
                              rope_parameters=LLAMA3_ROPE),
    "llama-mha-tied": dict(kind="llama", num_heads=4, num_kv_heads=4, tie=True),
    "mistral-window": dict(kind="mistral", num_heads=4, num_kv_heads=1, sliding_window=7),
    "qwen2-bias-tied": dict(kind="qwen2", num_heads=4, num_kv_heads=2, tie=True),
    "qwen2-mha": dict(kind="qwen2", num_heads=4, num_kv_heads=4, tie=False),
}

SEQ = 24


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    hf = hf_models.build(spec.pop("kind"), **spec)
    folder = hf_models.save(hf, tmp_path_factory.mktemp(request.param))
    model, cfg = load_hf_folder(folder)
    return hf, model, cfg


def _tokens(vocab, batch=2, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, SEQ))


def test_prefill_logits_match_transformers(pair):
    hf, model, cfg = pair
    tokens = _tokens(cfg.vocab_size)
    ours, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), hf_models.hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_decode_with_cache_matches_transformers(pair):
    hf, model, cfg = pair
    tokens = _tokens(cfg.vocab_size, seed=2)
    ref = hf_models.hf_logits(hf, tokens)
    cache = KVCache.create(cfg, batch=2, max_len=SEQ + 3, dtype=jnp.float32)
    prompt = 5
    pos = np.broadcast_to(np.arange(SEQ), tokens.shape)
    logits, cache = model(jnp.asarray(tokens[:, :prompt]), jnp.asarray(pos[:, :prompt]), cache)
    steps = [np.asarray(logits)]
    for t in range(prompt, SEQ):
        logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=1e-4, rtol=0)
