"""`ModelConfig`: the one description of a Llama-family decoder.

It round-trips with Hugging Face `config.json` (`from_hf_config` / `to_hf_config`). A field of
the HF config that changes the model's function and that we do not implement raises
`ConfigError` naming the field: silently ignoring it would give a model that looks right and
computes something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcompress.errors import ConfigError

# HF `model_type` -> the architecture string HF writes into `architectures`.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as HF's `rope_parameters` / `rope_scaling` describe it."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not implemented; supported: {', '.join(ROPE_TYPES)}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not a supported architecture; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | Any) -> "ModelConfig":
        """Builds a config from an HF `config.json` dict (or a `PretrainedConfig`)."""
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = hf.get("architectures")
            raise ConfigError(
                f"unknown architecture: model_type={model_type!r} (architectures={archs}); "
                f"jaxcompress supports {', '.join(ARCHITECTURES)}"
            )
        _refuse_unimplemented(hf, model_type)
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        theta, scaling = _rope_from_hf(hf)
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            sliding = hf.get("sliding_window")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_as_eos(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict for this model (new-style `rope_parameters`)."""
        rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope["factor"] = self.rope_scaling.factor
        if self.rope_scaling.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings,
            )
        elif self.rope_scaling.original_max_position_embeddings is not None:
            rope["original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        elif self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
        return hf


def _as_eos(value):
    if isinstance(value, list):
        return tuple(value) if len(value) != 1 else value[0]
    return value


def _refuse_unimplemented(hf: dict[str, Any], model_type: str) -> None:
    """Raises for config fields that would change the function and that we do not implement."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config field hidden_act={act!r} is not implemented (only 'silu')")
    if hf.get("mlp_bias"):
        raise ConfigError("config field mlp_bias=True is not implemented")
    if model_type == "qwen2" and hf.get("attention_bias") is False:
        raise ConfigError("config field attention_bias=False is not implemented for qwen2")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise ConfigError(f"config field pretraining_tp={hf['pretraining_tp']} is not implemented (only 1)")
    if hf.get("attention_dropout"):
        raise ConfigError(f"config field attention_dropout={hf['attention_dropout']} is not implemented")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        if hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"]:
            raise ConfigError(
                "config field max_window_layers (per-layer sliding windows in qwen2) is not implemented"
            )
    layer_types = hf.get("layer_types")
    if layer_types and model_type != "qwen2" and len(set(layer_types)) > 1:
        raise ConfigError(f"config field layer_types with mixed attention types {set(layer_types)} is not implemented")
    for field in ("quantization_config", "rope_interleaved"):
        if hf.get(field):
            raise ConfigError(f"config field {field} is not implemented; convert the checkpoint to dense weights first")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Reads RoPE from the new `rope_parameters` or the older `rope_scaling` + `rope_theta`."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta"))
    known = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "partial_rotary_factor"}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"config field rope_parameters has keys {sorted(unknown)} that are not implemented")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config field partial_rotary_factor != 1.0 is not implemented")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"config field rope_type={rope_type!r} is not implemented; supported: {', '.join(ROPE_TYPES)}"
        )
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
    )
    return theta, scaling
