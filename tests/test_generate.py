"""Generation: greedy decoding equals transformers' for batched, left-padded prompts; sampling
filters against hand-computed references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcompress.errors import UserError
from jaxcompress.io.hf import load_hf_folder
from jaxcompress.models.generate import SamplingConfig, generate_tokens
from jaxcompress.models.sampling import filter_top_k, filter_top_p, sample


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_models.build("llama", num_heads=4, num_kv_heads=2)
    model, cfg = load_hf_folder(hf_models.save(hf, tmp_path_factory.mktemp("gen")))
    return hf, model


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_batched_greedy_equals_transformers(tiny):
    hf, model = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, size=n).tolist() for n in (5, 11, 2)]
    ours = generate_tokens(model, prompts, SamplingConfig(max_new_tokens=12))
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(hf, prompt, 12)


def test_stop_token_ends_row(tiny):
    hf, model = tiny
    prompt = [5, 6, 7, 8]
    ref = _hf_greedy(hf, prompt, 10)
    stop = ref[3]
    got = generate_tokens(model, [prompt], SamplingConfig(max_new_tokens=10), stop_ids=(stop,))[0]
    assert got == ref[: ref.index(stop) + 1]


def test_too_long_is_an_error(tiny):
    _, model = tiny
    with pytest.raises(UserError, match="max_position_embeddings"):
        generate_tokens(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=1000))


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = np.asarray(filter_top_k(logits, 2))
    assert np.isfinite(k2[0, :2]).all() and np.isinf(k2[0, 2:]).all()
    # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 and 0.05 are cut.
    p = np.asarray(filter_top_p(logits, 0.8))
    assert np.isfinite(p[0, :3]).all() and np.isinf(p[0, 3:]).all()
    # Even a tiny p keeps the most likely token.
    assert np.isfinite(np.asarray(filter_top_p(logits, 1e-6))[0, 0])


def test_sampling_follows_the_distribution():
    probs = np.asarray([0.6, 0.3, 0.1])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1))))
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=1.0))
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015)
    assert (np.asarray(sample(logits[:4], jax.random.key(1), temperature=1.0, top_k=1)) == 0).all()
