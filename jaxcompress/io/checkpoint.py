"""Orbax checkpoints of a model: config, parameters (compressed leaves included), tokenizer.

Layout of a checkpoint folder written by `save_checkpoint` (and `jaxcompress convert`):

    jaxcompress.json   config, leaf structure, recipe and provenance
    params/            orbax StandardCheckpointer tree: {"<path>": array}
    tokenizer/         the tokenizer, when the model has one

Compressed leaves are registered dataclass pytrees (QArray, LoRA, ...). They are stored as
their array fields under `<path>/<field>` with their class name and static fields in
`jaxcompress.json`, and rebuilt on restore: any dataclass leaf type registered with
`register_leaf_type` round-trips bit-exactly, nested ones (LoRA over a QArray) too.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.errors import CheckpointError
from jaxcompress.io.atomic import atomic_dir
from jaxcompress.models.build import abstract_model, flat_params, path_str
from jaxcompress.models.config import ModelConfig, RopeScaling

FORMAT = "jaxcompress-checkpoint-1"
MARKER = "jaxcompress.json"
_LEAF_TYPES: dict[str, type] = {}
# Where the library's own leaf types live, so a checkpoint loads without importing them first.
_LEAF_MODULES = {"QArray": "jaxcompress.quant.qarray", "TiledQArray": "pallas_kernels.layout",
                 "W4Weight": "pallas_kernels.wgmma_matmul",
                 "LoRA": "jaxcompress.train.lora", "FakeQuant": "jaxcompress.train.qat"}


def register_leaf_type(cls: type) -> type:
    """Makes a dataclass pytree leaf type restorable from checkpoints (use as a decorator)."""
    _LEAF_TYPES[cls.__name__] = cls
    return cls


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _encode(value: Any, prefix: str, arrays: dict) -> Any:
    """Splits a leaf into arrays (into `arrays`) and a JSON description."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value):
        desc = {"type": type(value).__name__, "static": {}, "fields": {}}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("static"):
                desc["static"][f.name] = list(v) if isinstance(v, tuple) else v
            else:
                desc["fields"][f.name] = _encode(v, f"{prefix}/{f.name}", arrays)
        return desc
    arrays[prefix] = np.asarray(value)
    return {"array": prefix}


def _decode(desc: Any, arrays: dict) -> Any:
    if desc is None:
        return None
    if "array" in desc:
        return jnp.asarray(arrays[desc["array"]])
    cls = _LEAF_TYPES.get(desc["type"])
    if cls is None and desc["type"] in _LEAF_MODULES:
        importlib.import_module(_LEAF_MODULES[desc["type"]])  # registers the type on import
        cls = _LEAF_TYPES.get(desc["type"])
    if cls is None:
        raise CheckpointError(f"checkpoint uses leaf type {desc['type']!r}, which is not registered; "
                              f"import the module that defines it")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in desc["static"].items()}
    kwargs.update({k: _decode(v, arrays) for k, v in desc["fields"].items()})
    return cls(**kwargs)


def config_to_json(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


def save_checkpoint(model, folder: str, tokenizer=None, extra: dict | None = None) -> None:
    """Writes the model to `folder` atomically (complete or absent, never half-written)."""
    import orbax.checkpoint as ocp

    arrays: dict[str, np.ndarray] = {}
    leaves = {path_str(p): _encode(v, path_str(p), arrays) for p, v in flat_params(model).items()}
    meta = {"format": FORMAT, "config": config_to_json(model.config),
            "dtype": jnp.dtype(model.dtype).name, "leaves": leaves, **(extra or {})}
    with atomic_dir(folder) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), arrays)
        ckptr.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(meta, f, indent=1, default=str)


def load_checkpoint(folder: str):
    """(model, tokenizer or None, metadata) from a folder written by `save_checkpoint`."""
    import orbax.checkpoint as ocp
    from flax import nnx

    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"{folder}: not a jaxcompress checkpoint (no {MARKER})")
    with open(marker) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: unknown checkpoint format {meta.get('format')!r}")
    cfg = config_from_json(meta["config"])
    try:
        arrays = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(folder, "params")))
    except Exception as e:  # orbax raises many types for a damaged tree
        raise CheckpointError(f"{folder}/params: cannot restore parameters ({type(e).__name__}: {e})") from None
    graphdef, state = nnx.split(abstract_model(cfg, jnp.float32, jnp.dtype(meta["dtype"])))
    for path, var in nnx.to_flat_state(state):
        name = path_str(path)
        if name not in meta["leaves"]:
            raise CheckpointError(f"{folder}: parameter {name} is missing")
        var.set_value(_decode(meta["leaves"][name], arrays))
    model = nnx.merge(graphdef, state)
    tokenizer = None
    if os.path.isdir(os.path.join(folder, "tokenizer")):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    return model, tokenizer, meta
