"""`quantize_weights`: a model and a `weights:` config in, the quantized model and a record out.

    policy  = resolve_policy(paths, weights)              # which leaf gets which LayerConfig
    RTN leaves                -> rtn_params               (pure map over the parameter tree)
    gptq / awq leaves         -> calibrate(model, tokens, GPTQ() / AWQ())   (block by block)
    squeezellm leaves         -> fisher_diagonal, then squeezellm_params    (pure map)

Leaves a rule sends to RTN are quantized before GPTQ (so the sequential pass sees them
quantized, as any other quantized layer) and after AWQ / SqueezeLLM (so AWQ's scales are
folded into them first, and the Fisher information is the float model's).
"""

from __future__ import annotations

import time
from typing import Callable

import jax

from jaxcompress.calibrate import calibrate, fisher_diagonal
from jaxcompress.data.calibration import CalibrationConfig, calibration_set
from jaxcompress.errors import ConfigError
from jaxcompress.models.build import flat_params, params, path_str, with_params
from jaxcompress.quant.awq import AWQ
from jaxcompress.quant.config import WeightsConfig, resolve_policy
from jaxcompress.quant.gptq import GPTQ
from jaxcompress.quant.rtn import rtn_params
from jaxcompress.quant.squeezellm import squeezellm_params


def _policy(model, weights: WeightsConfig):
    leaves = {path_str(p): v for p, v in flat_params(model).items()}
    shapes = {p: tuple(v.shape) for p, v in leaves.items()}
    policy = resolve_policy(list(leaves), weights, shapes)
    if not policy:
        raise ConfigError(f"weights: no parameter matches targets={weights.targets!r} or a rule; nothing to quantize")
    compressed = [p for p in policy if not isinstance(leaves[p], jax.Array)]
    if compressed:
        raise ConfigError(f"{compressed[0]}: is already compressed ({type(leaves[compressed[0]]).__name__}); "
                          f"weights can be quantized once")
    return policy


def quantize_weights(model, weights: WeightsConfig, calibration: CalibrationConfig | None = None, *,
                     tokenizer=None, data_dir: str | None = None, tokens=None,
                     log: Callable[[str], None] | None = None):
    """(quantized model, record). `tokens` [n, T] overrides the calibration sampler."""
    start = time.time()
    policy = _policy(model, weights)
    rtn = {p: c for p, c in policy.items() if c.method == "rtn"}
    main = {p: c for p, c in policy.items() if c.method != "rtn"}
    method = weights.method
    record = {"method": method, "quantized": len(policy), "rtn_layers": len(rtn),
              "bits": sorted({c.bits for c in policy.values()})}
    if rtn and method in ("rtn", "gptq"):
        model = with_params(model, rtn_params(params(model), rtn))
    if main:
        if tokens is None:
            calibration = calibration or CalibrationConfig()
            calib = calibration_set(tokenizer, calibration, data_dir, vocab_size=model.config.vocab_size)
            tokens, record["calibration"] = calib.tokens, calib.record
        batch = calibration.batch_size if calibration is not None else 8
        t0 = time.time()
        opts = weights.layer
        if method == "gptq":
            model, report = calibrate(model, tokens, GPTQ(true_sequential=opts.gptq.true_sequential,
                                                          sequential=opts.gptq.sequential),
                                      main, batch_size=batch, log=log)
            record["layers"] = report["layers"]
        elif method == "awq":
            model, report = calibrate(model, tokens, AWQ(grid=opts.awq.grid, search_samples=opts.awq.search_samples,
                                                         sequential=opts.awq.sequential),
                                      main, batch_size=batch, log=log)
            record["layers"] = report["layers"]
        elif method == "squeezellm":
            fisher = fisher_diagonal(model, tokens, list(main), log=log)
            model = with_params(model, squeezellm_params(params(model), fisher, main))
            del fisher
        else:
            raise ConfigError(f"weights.method={method!r} has no calibrated implementation")
        record["method_seconds"] = round(time.time() - t0, 2)
    if rtn and method not in ("rtn", "gptq"):
        model = with_params(model, rtn_params(params(model), rtn))
    jax.block_until_ready(jax.tree_util.tree_leaves(params(model)))
    record["seconds"] = round(time.time() - start, 2)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        record["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    record["weight_bits"] = _bits_per_weight(model, policy)
    return model, record


def _bits_per_weight(model, policy) -> float:
    """Average storage bits per weight over the quantized leaves (scales, zeros, ... included)."""
    leaves = {path_str(p): v for p, v in flat_params(model).items()}
    total_bytes = sum(leaves[p].nbytes() for p in policy)
    count = sum(leaves[p].shape[0] * leaves[p].shape[1] for p in policy)
    return round(8 * total_bytes / count, 4)
