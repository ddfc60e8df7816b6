"""Bad model input: each case raises a UserError subclass whose message names the file and the
problem (and, being an exception, returns no model). Loaded through `load_model`, the entry
point the CLI uses."""

import json
import os
import shutil

import numpy as np
import pytest

import gguf_models
import hf_models
from jaxcompress.errors import CheckpointError, ConfigError, UserError
from jaxcompress.io.load import load_model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return hf_models.save(hf_models.build("llama", num_heads=4, num_kv_heads=2),
                          tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    hf = hf_models.build("llama", num_heads=4, num_kv_heads=2)
    return gguf_models.from_hf(hf, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _raises(cls, spec, *fragments):
    with pytest.raises(cls) as info:
        load_model(str(spec))
    assert isinstance(info.value, UserError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def test_missing_files(tmp_path):
    _raises(UserError, tmp_path / "nope.gguf", "nope.gguf", "no such GGUF file")
    _raises(UserError, tmp_path / "nope", "nope", "not a model")
    os.mkdir(tmp_path / "empty")
    _raises(CheckpointError, tmp_path / "empty", "empty", "no config.json")


def test_smollm2_override_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCOMPRESS_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    _raises(UserError, "smollm2-135m", "JAXCOMPRESS_SMOLLM2_GGUF", "missing.gguf", "no such file")


def test_truncated_safetensors(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    _raises(CheckpointError, folder, weights, "corrupt or truncated")


def test_missing_shard_in_index(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    _raises(CheckpointError, folder, "model-00002-of-00002.safetensors", "missing")


def test_tensor_shape_mismatch(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    _edit_config(folder, intermediate_size=128)  # the weights were made with 112
    _raises(CheckpointError, folder, "model.safetensors", "mlp.down_proj.kernel", "(112, 64)", "(128, 64)")


def test_unknown_architecture(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    _raises(ConfigError, folder, "config.json", "unknown architecture", "gpt2")


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("mlp_bias", True),
                                         ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_unsupported_config_field(hf_folder, tmp_path, field, value):
    folder = _copy(hf_folder, tmp_path)
    _edit_config(folder, **{field: value})
    if field == "rope_scaling":
        _edit_config(folder, rope_parameters=None)
    _raises(ConfigError, folder, "config.json", field if field != "rope_scaling" else "yarn", "not implemented")


def test_missing_tensor_names_the_folder(hf_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy(hf_folder, tmp_path)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    _raises(CheckpointError, folder, str(folder), "missing 1 tensors", "layers.1.mlp.up_proj.kernel")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf(gguf_file, tmp_path, keep):
    """Cut in the tensor data (0.5) and in the metadata (0.02)."""
    path = tmp_path / "cut.gguf"
    data = open(gguf_file, "rb").read()
    path.write_bytes(data[: int(len(data) * keep)])
    _raises(CheckpointError, path, "cut.gguf", "corrupt or truncated")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _raises(CheckpointError, path, "noise.gguf", "not a readable GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(CheckpointError, empty, "empty.gguf", "not a readable GGUF file")


def test_gguf_unknown_architecture(tmp_path):
    path = gguf_models.write(tmp_path / "gpt2.gguf", "gpt2", {".block_count": 2},
                             {"token_embd.weight": np.zeros((8, 4), np.float32)})
    _raises(ConfigError, path, "gpt2.gguf", "general.architecture='gpt2'", "llama")


def test_gguf_missing_and_unknown_tensors(gguf_file, tmp_path):
    from jaxcompress.io.gguf import open_gguf

    reader = open_gguf(gguf_file)
    meta = {k[len("llama"):]: v.contents() for k, v in reader.fields.items() if k.startswith("llama.")}
    for key in (".rope.freq_base", ".attention.layer_norm_rms_epsilon"):
        meta[key] = float(meta[key])
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}

    missing = dict(tensors)
    del missing["blk.1.ffn_down.weight"]
    path = gguf_models.write(tmp_path / "missing.gguf", "llama", meta, missing)
    _raises(CheckpointError, path, "missing.gguf", "missing 1 tensors", "layers.1.mlp.down_proj.kernel")

    extra = {**tensors, "blk.0.ffn_gate_exps.weight": np.zeros((4, 8), np.float32)}
    path = gguf_models.write(tmp_path / "extra.gguf", "llama", meta, extra)
    _raises(CheckpointError, path, "extra.gguf", "blk.0.ffn_gate_exps.weight", "unknown tensor name")

    wrong = {**tensors, "blk.0.attn_v.weight": np.zeros((16, 64), np.float32)}  # config implies 32 rows
    path = gguf_models.write(tmp_path / "shape.gguf", "llama", meta, wrong)
    _raises(CheckpointError, path, "shape.gguf", "blk.0.attn_v.weight", "v_proj.kernel", "(64, 16)")


def test_damaged_orbax_checkpoint(hf_folder, tmp_path):
    from jaxcompress.io.checkpoint import MARKER, save_checkpoint

    model = load_model(hf_folder).model
    folder = tmp_path / "ckpt"
    save_checkpoint(model, str(folder))
    shutil.rmtree(folder / "params")
    _raises(CheckpointError, folder, str(folder / "params"), "cannot restore")
    with open(folder / MARKER) as f:
        meta = json.load(f)
    meta["format"] = "something-else"
    with open(folder / MARKER, "w") as f:
        json.dump(meta, f)
    _raises(CheckpointError, folder, MARKER, "unknown checkpoint format")
