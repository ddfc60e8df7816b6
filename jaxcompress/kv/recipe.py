"""The `kv_cache:` recipe section: which codec the KV cache uses, fitted when it needs data.

    kv_cache:
      method: kivi          # kivi | kvquant | int | none
      key_bits: 2           # 2, 3, 4 or 8 (`bits: b` sets both, overriding these)
      value_bits: 2
      group_size: 32        # kivi: tokens per key group = channels per value group
      residual: 128         # kivi: recent tokens kept in full precision (at least)
      symmetric: false      # int
      granularity: head     # int: head | token | tensor (tensor is calibrated)
      outlier_fraction: 0.01  # kvquant: dense-and-sparse budget per token vector
      sink: 1               # kvquant (default 1), kivi (default 0): first tokens kept exact
      attention: auto       # auto (Pallas on GPU) | pallas | interpret | reference (method none too)
      layout: auto          # kivi: auto | channel_words | token_rows (the stores' layout, i.e. the decode kernel)
      columns: 32           # kivi, channel_words: word columns of a decode-kernel tile
      flush_per_step: true  # kivi: one conditional a decode step flushes every layer (false: one a layer)
      values_pass: auto     # kivi, channel_words: the decode kernel's values pass, auto | wgmma (Hopper's
                            # tensor cores) | cuda (paired fp16 on the CUDA cores)
      calibration:          # kvquant, int/tensor: activations the codec is fitted on
        source: wikitext2
        num_samples: 16
        seqlen: 512
        seed: 0
        batch_size: 4

It composes with `weights:` (applied first): `loaded.kv_codec` is set, the weights are left
alone. The record (`loaded.recipe["applied"]["kv_cache"]`) holds the codec, its exact bytes
per token and its compression ratio against a bf16 cache.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxcompress.errors import ConfigError
from jaxcompress.kv.calibration import collect_kv
from jaxcompress.kv.kivi import KIVICodec
from jaxcompress.kv.kvquant import KVQuantCodec, fit_kvquant
from jaxcompress.kv.uniform import UniformCodec, fit_uniform_tensor
from jaxcompress.models.cache import IdentityCodec

METHODS = {
    "kivi": {"key_bits": 2, "value_bits": 2, "group_size": 32, "residual": 128, "sink": 0, "attention": "auto",
             "layout": "auto", "columns": 32, "flush_per_step": True, "values_pass": "auto"},
    "kvquant": {"key_bits": 3, "value_bits": 3, "outlier_fraction": 0.01, "sink": 1, "attention": "auto"},
    "int": {"key_bits": 8, "value_bits": 8, "symmetric": False, "granularity": "head", "attention": "auto"},
    "none": {"attention": "auto"},  # the bf16 cache; attention: auto (Pallas decode kernel on GPU) | reference
}
CALIBRATION_DEFAULTS = {"source": "wikitext2", "num_samples": 16, "seqlen": 512, "seed": 0, "batch_size": 4}


def _needs_calibration(section: dict) -> bool:
    return section["method"] == "kvquant" or (section["method"] == "int" and section["granularity"] == "tensor")


def normalize_section(section: dict) -> dict:
    """Defaults filled for the chosen method; a key the method does not use is an error."""
    section = dict(section)
    method = section.pop("method", "kivi")
    if method not in METHODS:
        raise ConfigError(f"kv_cache.method={method!r} is not a KV codec; choose one of {', '.join(METHODS)}")
    if "bits" in section:  # shorthand (and sweep axis): sets both
        bits = section.pop("bits")
        section["key_bits"] = section["value_bits"] = bits
    calibration = section.pop("calibration", None)
    allowed = METHODS[method]
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f"kv_cache.{unknown[0]} is not an option of method {method}; "
                          f"its options: {', '.join(sorted(allowed)) or 'none'} (and bits, calibration)")
    out = {"method": method, **allowed, **section}
    build_codec(out)  # validates bits, group size, granularity, attention, ...
    if _needs_calibration(out):
        cal = {**CALIBRATION_DEFAULTS, **(calibration or {})}
        from jaxcompress.data.calibration import CalibrationConfig
        from jaxcompress.quant.config import from_dict

        out["calibration"] = dataclasses.asdict(from_dict(CalibrationConfig, cal, "kv_cache.calibration"))
    elif calibration:
        raise ConfigError(f"kv_cache.calibration is not used by method {method}"
                          + (f" with granularity {out.get('granularity')}" if method == "int" else ""))
    return out


def build_codec(section: dict, calibration=None):
    """The codec a normalized section describes (None for method `none`)."""
    opts = {k: v for k, v in section.items() if k not in ("method", "calibration")}
    method = section["method"]
    if method == "none":  # the default cache (None) unless its attention path is chosen
        return None if opts.get("attention", "auto") == "auto" else IdentityCodec(**opts)
    if method == "kivi":
        return KIVICodec(**opts)
    if method == "kvquant":
        return KVQuantCodec(**opts, calibration=calibration)
    return UniformCodec(**opts, calibration=calibration)


def calibrate(loaded, section: dict, data_dir: str | None = None, log=None):
    """Fits what the section's codec needs on calibration activations; (calibration, record)."""
    from jaxcompress.data.calibration import CalibrationConfig, calibration_set
    from jaxcompress.quant.config import from_dict

    cfg = from_dict(CalibrationConfig, section["calibration"], "kv_cache.calibration")
    data = calibration_set(loaded.tokenizer, cfg, data_dir, vocab_size=loaded.config.vocab_size)
    start = time.time()
    kvquant = section["method"] == "kvquant"
    layers = None
    for i in range(0, len(data.tokens), cfg.batch_size):
        batch = collect_kv(loaded.model, data.tokens[i:i + cfg.batch_size], pre_rope=kvquant, fisher=kvquant)
        layers = batch if layers is None else [
            {name: np.concatenate([acc[name], new[name]]) for name in acc} for acc, new in zip(layers, batch)]
    if kvquant:
        cal = fit_kvquant(layers, section["key_bits"], section["value_bits"], section["outlier_fraction"],
                          sink=section["sink"])
    else:
        cal = fit_uniform_tensor(layers, section["key_bits"], section["value_bits"], section["symmetric"])
    if log:
        log(f"kv_cache: fitted {section['method']} on {data.tokens.size} tokens in {time.time() - start:.1f}s")
    return cal, {**data.record, "fit_seconds": round(time.time() - start, 2), "digest": cal.digest}


def apply_kv_cache(loaded, section: dict, ctx=None):
    """Recipe hook: sets `loaded.kv_codec`; returns (loaded, record)."""
    from jaxcompress.kv.memory import cache_summary, codec_name

    data_dir = getattr(ctx, "data_dir", None)
    log = getattr(ctx, "log", None)
    calibration, cal_record = None, None
    if _needs_calibration(section):
        calibration, cal_record = calibrate(loaded, section, data_dir, log)
    codec = build_codec(section, calibration)
    record = {"codec": codec_name(codec),
              **cache_summary(loaded.config, codec, loaded.config.max_position_embeddings)}
    if cal_record is not None:
        record["calibration"] = cal_record
    return dataclasses.replace(loaded, kv_codec=codec), record


def _register() -> None:
    from jaxcompress.experiments.recipes import register_recipe_section

    register_recipe_section("kv_cache", apply_kv_cache, normalize_section)


_register()
