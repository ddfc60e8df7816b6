"""The calibration engine (against projection inputs captured from Hugging Face's model with
torch hooks) and the calibration data sampler."""

import copy
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcompress.calibrate import (TRUE_SEQUENTIAL, AbsMean, Hessian, LayerMethod, Samples, calibrate)
from jaxcompress.data.calibration import CalibrationConfig, calibration_set, read_text, source_path
from jaxcompress.data.paths import data_dir
from jaxcompress.errors import UserError
from jaxcompress.io.hf import load_hf_folder

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_models.build("llama")
    model, _ = load_hf_folder(hf_models.save(hf, tmp_path_factory.mktemp("hf")), param_dtype=jnp.float32)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (3, 24), 0, hf.config.vocab_size))
    return hf, model, tokens


def hf_hessians(hf, tokens):
    """{path: X^T X / tokens} of every projection's input, captured with torch forward hooks."""
    seen, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        for name in LINEARS:
            module = layer.get_submodule(name)
            path = f"layers.{i}.{name}.kernel"
            hooks.append(module.register_forward_hook(
                lambda m, args, out, path=path: seen.__setitem__(path, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        hf(torch.as_tensor(np.array(tokens)))
    for h in hooks:
        h.remove()
    return {p: (x.T @ x / x.shape[0]).double().numpy() for p, x in seen.items()}


class Recorder(LayerMethod):
    """Keeps every statistic; replaces the kernels named in `zero` by zeros."""

    def __init__(self, zero=(), sequential=True, stages=None):
        self.seen, self.zero, self.sequential, self._stages = {}, set(zero), sequential, stages

    def statistic(self, path, cfg):
        return Hessian()

    def stages(self, names):
        return self._stages or [names]

    def compress_layer(self, path, w, stat, cfg):
        self.seen[path] = np.asarray(stat, np.float64)
        return jnp.zeros_like(w) if path in self.zero else w


def _all_targets(model):
    return {f"layers.{i}.{n}.kernel": None for i in range(len(model.layers)) for n in LINEARS}


@pytest.mark.parametrize("sequential", [True, False])
def test_statistics_match_hooked_transformers_inputs(tiny, sequential):
    hf, model, tokens = tiny
    zeroed = "layers.0.self_attn.o_proj.kernel"
    method = Recorder(zero=[zeroed], sequential=sequential)
    new, report = calibrate(model, tokens, method, _all_targets(model), batch_size=2)
    reference = hf_hessians(hf, tokens)
    for path in (p for p in reference if p.startswith("layers.0.self_attn")):  # before o_proj: untouched
        np.testing.assert_allclose(method.seen[path], reference[path], rtol=2e-4, atol=1e-6)
    # Sequential: layer 1 sees layer 0 with its o_proj zeroed; otherwise the original layer 0.
    if sequential:
        hf = copy.deepcopy(hf)
        with torch.no_grad():
            hf.model.layers[0].self_attn.o_proj.weight.zero_()
        reference = hf_hessians(hf, tokens)
    for path in (p for p in reference if p.startswith("layers.1")):
        np.testing.assert_allclose(method.seen[path], reference[path], rtol=2e-4, atol=1e-6)
    assert bool(jnp.all(new.layers[0].self_attn.o_proj.kernel.get_value() == 0))
    assert not bool(jnp.all(model.layers[0].self_attn.o_proj.kernel.get_value() == 0))  # input unchanged
    assert len(report["block_seconds"]) == 2


def test_true_sequential_stages_see_earlier_stages_compressed(tiny):
    _, model, tokens = tiny
    # v_proj zeroed in stage 1 -> the attention output, o_proj's input, is exactly zero in stage 2.
    method = Recorder(zero=["layers.0.self_attn.v_proj.kernel"], stages=[list(s) for s in TRUE_SEQUENTIAL])
    calibrate(model, tokens, method, _all_targets(model), batch_size=3)
    assert np.all(method.seen["layers.0.self_attn.o_proj.kernel"] == 0)
    one_stage = Recorder(zero=["layers.0.self_attn.v_proj.kernel"])
    calibrate(model, tokens, one_stage, _all_targets(model), batch_size=3)
    assert np.abs(one_stage.seen["layers.0.self_attn.o_proj.kernel"]).max() > 1e-3


def test_other_statistics(tiny):
    _, model, tokens = tiny
    # q, k and v read the same input: the full samples, the first two sequences, the mean |x|.
    chosen = {"layers.1.self_attn.q_proj.kernel": Samples(), "layers.1.self_attn.k_proj.kernel": Samples(max_seqs=2),
              "layers.1.self_attn.v_proj.kernel": AbsMean()}

    class Keep(LayerMethod):
        seen = {}

        def statistic(self, path, cfg):
            return chosen[path]

        def compress_layer(self, path, w, stat, cfg):
            self.seen[path] = np.asarray(stat, np.float64)
            return w

    calibrate(model, tokens, Keep(), dict.fromkeys(chosen), batch_size=3)
    x = Keep.seen["layers.1.self_attn.q_proj.kernel"]
    assert x.shape == (3, 24, model.config.hidden_size)
    np.testing.assert_array_equal(Keep.seen["layers.1.self_attn.k_proj.kernel"], x[:2])
    np.testing.assert_allclose(Keep.seen["layers.1.self_attn.v_proj.kernel"], np.abs(x).mean((0, 1)), rtol=1e-5)


def test_non_finite_activations_name_the_layer(tiny):
    _, model, tokens = tiny
    from jaxcompress.quant.tree import replace_leaves

    bad = replace_leaves(model, {"layers.1.post_attention_layernorm.scale":
                                 model.layers[1].post_attention_layernorm.scale.get_value().at[3].set(jnp.nan)})
    with pytest.raises(UserError, match=r"layers.1.mlp.gate_proj.kernel: the Hessian of its calibration inputs "
                                        r"contains \d+ non-finite value\(s\) \(first: nan"):
        calibrate(bad, tokens, Recorder(), _all_targets(model))
    bad = replace_leaves(model, {"embed_tokens.embedding": model.embed_tokens.embedding.get_value().at[
        int(tokens[1, 5])].set(jnp.inf)})
    with pytest.raises(UserError, match=r"embeddings of the calibration tokens contains \d+ non-finite value\(s\) "
                                        r"\(first: inf at index \(1, 5, 0\)"):
        calibrate(bad, tokens, Recorder(), _all_targets(model))


# ------------------------------------------------------------------------------- sampler
@pytest.fixture(scope="module")
def tokenizer():
    import eval_tiny

    return eval_tiny.train_tokenizer(data_dir())


def test_windows_are_slices_of_the_tokenized_text(tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(read_text(source_path("wikitext2"))[:20000], encoding="utf-8")
    cfg = CalibrationConfig(source=str(path), num_samples=5, seqlen=64, seed=3)
    calib = calibration_set(tokenizer, cfg)
    stream = np.asarray(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    assert calib.tokens.shape == (5, 64) and calib.tokens.dtype == np.int32
    for row, offset in zip(calib.tokens, calib.record["offsets"]):
        np.testing.assert_array_equal(row, stream[offset:offset + 64])
    assert calib.record["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert calib.record["stream_tokens"] == len(stream) and calib.record["seed"] == 3
    again = calibration_set(tokenizer, cfg)
    np.testing.assert_array_equal(again.tokens, calib.tokens)
    other = calibration_set(tokenizer, CalibrationConfig(source=str(path), num_samples=5, seqlen=64, seed=4))
    assert other.record["offsets"] != calib.record["offsets"]


def test_sources_and_bad_input(tokenizer, tmp_path):
    assert source_path("c4").endswith("c4_demo_300.jsonl") and source_path("gsm8k").endswith("train.jsonl")
    rows = tmp_path / "task.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, {"text": "plain text"}]), encoding="utf-8")
    assert read_text(str(rows)) == "Question: What is 2+3?\nAnswer: 2+3=5\n#### 5\n\nplain text"
    with pytest.raises(UserError, match="fewer than calibration.seqlen=4096"):
        calibration_set(tokenizer, CalibrationConfig(source=str(rows), seqlen=4096))
    with pytest.raises(UserError, match="calibration.source='nope': not a known source"):
        calibration_set(tokenizer, CalibrationConfig(source="nope"))
    with pytest.raises(UserError, match="has no tokenizer"):
        calibration_set(None, CalibrationConfig())
    rand = calibration_set(None, CalibrationConfig(source="random", num_samples=2, seqlen=8), vocab_size=50)
    assert rand.tokens.shape == (2, 8) and rand.tokens.max() < 50


def test_hessian_with_a_weighted_first_token_matches_float64():
    x = np.random.default_rng(1).standard_normal((3, 6, 4)).astype(np.float32)
    for w in (1.0, 100.0):
        stat = Hessian(first_token_weight=w)
        state = stat.init(3, 6, 4, jnp.float32, 2)
        state = stat.update(state, jnp.asarray(x[:2]), jnp.int32(0))
        state = stat.update(state, jnp.asarray(x[2:]), jnp.int32(2))
        x64 = x.astype(np.float64)
        weights = np.ones((3, 6))
        weights[:, 0] = w  # each window's first token counts w times
        expected = np.einsum("st,sti,stj->ij", weights, x64, x64) / weights.sum()
        np.testing.assert_allclose(np.asarray(stat.finalize(state)), expected, rtol=1e-5, atol=1e-6)
