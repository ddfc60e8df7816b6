"""Hugging Face checkpoints: folders of safetensors (single or sharded) + config.json.

The name map is declarative: HF `model.layers.3.self_attn.q_proj.weight` is our
`layers.3.self_attn.q_proj.kernel`, transposed to `[in, out]`. Both directions use it.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from jaxcompress.errors import CheckpointError, ConfigError, UserError
from jaxcompress.models.build import Path, flat_params, model_from_tensors, path_str
from jaxcompress.models.config import ModelConfig

# Our module name -> the attribute that holds its weight.
_LEAF_NAME = {"embed_tokens": "embedding", "input_layernorm": "scale",
              "post_attention_layernorm": "scale", "norm": "scale"}
# HF tensors that are derived buffers, not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name_to_path(name: str) -> tuple[Path, bool]:
    """HF tensor name -> (our path, whether to transpose)."""
    parts = name.split(".")
    if parts[0] == "model":
        parts = parts[1:]
    *module, kind = parts
    path = tuple(int(p) if p.isdigit() else p for p in module)
    owner = module[-1] if module else ""
    if kind == "bias":
        return path + ("bias",), False
    if owner in _LEAF_NAME:
        return path + (_LEAF_NAME[owner],), False
    return path + ("kernel",), True


def path_to_hf_name(path: Path) -> tuple[str, bool]:
    """Our path -> (HF tensor name, whether to transpose)."""
    *module, leaf = path
    prefix = "" if module == ["lm_head"] else "model."
    kind = "bias" if leaf == "bias" else "weight"
    return prefix + ".".join(str(p) for p in module) + "." + kind, leaf == "kernel"


def read_config(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs one")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    paths = [os.path.join(folder, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: listed in the index but missing; re-download the checkpoint")
    return paths


def iter_hf_tensors(folder: str, cfg: ModelConfig) -> Iterator[tuple[Path, np.ndarray, str]]:
    """Streams (path, array, source) one tensor at a time from the folder's safetensors."""
    from safetensors import SafetensorError, safe_open

    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # a stored copy of the tied embedding
                    path, transpose = hf_name_to_path(name)
                    array = f.get_tensor(name)
                    yield path, (array.T if transpose else array), f"{file}: {name}"
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def load_hf_folder(folder: str, param_dtype=None, dtype=None, sharding=None):
    """(model, config) from a Hugging Face checkpoint folder."""
    import jax.numpy as jnp

    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such checkpoint folder")
    cfg = read_config(folder)
    param_dtype = param_dtype or jnp.float32
    try:
        model = model_from_tensors(cfg, iter_hf_tensors(folder, cfg), param_dtype, dtype, sharding)
    except CheckpointError as e:
        if folder in str(e):
            raise
        raise CheckpointError(f"{folder}: {e}") from None  # e.g. missing tensors: name the folder
    return model, cfg


def export_hf_folder(model, folder: str, tokenizer=None, dtype=None) -> None:
    """Writes config.json + model.safetensors (dense weights) that transformers loads.

    Compressed leaves are written as their dequantized dense matrices. The folder appears
    complete or not at all (written to a temporary folder, then renamed).
    """
    from safetensors.numpy import save_file

    from jaxcompress.io.atomic import atomic_dir
    from jaxcompress.ops.linear import dense_weight

    cfg: ModelConfig = model.config
    tensors = {}
    for path, leaf in flat_params(model).items():
        name, transpose = path_to_hf_name(path)
        array = np.asarray(dense_weight(leaf))
        if dtype is not None:
            array = array.astype(dtype)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    with atomic_dir(folder) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf_config()
        hf["dtype"] = str(next(iter(tensors.values())).dtype)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def load_tokenizer(folder: str):
    """The folder's tokenizer, or None when it ships none."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
