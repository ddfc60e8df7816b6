"""The `weights:` section of a recipe: what to quantize, how, and per-layer rules.

    weights:
      method: gptq            # rtn | gptq | awq | squeezellm
      bits: 4                 # 2, 3, 4, 5, 6, 8
      group_size: 128         # a positive int (groups of input features), channel (or -1), tensor
      symmetric: false
      clip: minmax            # minmax | mse (search a shrunk range per group, `mse:` options)
      targets: 'layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj\\.kernel'   # regex over parameter paths
      rules:                  # first matching rule wins; a leaf no rule matches uses `targets`
        - {pattern: 'layers\\.\\d+\\.mlp\\.down_proj\\.kernel', overrides: {bits: 8}}
        - {pattern: 'layers\\.0\\..*', skip: true}
        - {pattern: 'lm_head\\.kernel', overrides: {method: rtn, bits: 8}}
      gptq: {...}  awq: {...}  squeezellm: {...}   # method options (defaults below)

`LayerConfig` is what one weight gets; `resolve_policy` maps every parameter path to its
LayerConfig (or leaves it dense). Unknown keys and bad values raise `ConfigError` naming them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Iterable

from jaxcompress.errors import ConfigError
from jaxcompress.quant.grid import GridSpec
from jaxcompress.quant.kmeans import INITS as KMEANS_INITS
from jaxcompress.quant.qarray import SUPPORTED_BITS, check_quant_args

METHODS = ("rtn", "gptq", "awq", "squeezellm")
CALIBRATED = ("gptq", "awq", "squeezellm")  # methods that need calibration data
DEFAULT_TARGETS = r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.kernel"
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class MSEOptions:
    grid: int = 100          # candidate ranges p * [xmin, xmax], p = 1 - i / grid
    max_shrink: float = 0.8  # ... for i < max_shrink * grid
    norm: float = 2.4        # |w - q| ** norm summed over the group


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01          # lambda = damp * mean(diag(H)), as the reference's percdamp
    max_damp: float = 1.0       # escalate damp x10 while the Cholesky fails, up to this
    act_order: bool = False     # quantize input features by decreasing Hessian diagonal
    static_groups: bool = False # group scales fixed before act-order (no permutation stored)
    block_size: int = 128       # lazy batch updates of this many rows
    true_sequential: bool = True  # q/k/v, then o, then gate/up, then down, re-tapping inputs
    sequential: bool = True     # feed the quantized block's outputs to the next block
    # Not in the paper: weight of each calibration window's first token (the attention sink) in
    # the Hessian; 1 = the published algorithm. See docs/results/quant_gptq_notes.md.
    sink_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class AWQOptions:
    grid: int = 20              # scale exponents alpha = i / grid, s = mean|x| ** alpha
    clip_search: bool = True    # search the weight clipping range (not for q/k)
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512      # tokens (strided subsample) the clip search scores
    search_samples: int = 128   # calibration sequences the scale search runs on
    sequential: bool = False    # the reference feeds the float block's outputs onward


@dataclasses.dataclass(frozen=True)
class SqueezeLLMOptions:
    outlier_fraction: float = 0.0    # largest-|w| fraction of each weight kept exactly
    sensitive_fraction: float = 0.0  # largest-Fisher fraction kept exactly
    kmeans_iters: int = 50           # weighted Lloyd iterations (the reference's max_iter)
    kmeans_init: str = "kmeans++"    # the reference's (sklearn) init; "quantile": weighted quantiles


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    method: str = "rtn"
    bits: int = 4
    group_size: int | str = 128
    symmetric: bool = False
    clip: str = "minmax"
    mse: MSEOptions = MSEOptions()
    scale_dtype: str = "float16"
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    squeezellm: SqueezeLLMOptions = SqueezeLLMOptions()

    def grid(self) -> GridSpec:
        return GridSpec(bits=self.bits, symmetric=self.symmetric, clip=self.clip, mse_grid=self.mse.grid,
                        mse_max_shrink=self.mse.max_shrink, mse_norm=self.mse.norm,
                        scale_dtype=self.scale_dtype)

    @property
    def per_tensor(self) -> bool:
        return self.group_size == "tensor"

    def group_for(self, k: int, where: str = "") -> int:
        """The group size in rows for a weight with k input features (k for channel / tensor);
        raises `ConfigError` naming `where` for a bad bit width or group size."""
        g = k if self.group_size in ("channel", "tensor", -1) else self.group_size
        check_quant_args(self.bits, g, k, where)
        return int(g)


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    overrides: dict | None = None
    skip: bool = False


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
    layer: LayerConfig
    targets: str = DEFAULT_TARGETS
    rules: tuple[Rule, ...] = ()

    @property
    def method(self) -> str:
        return self.layer.method


# ------------------------------------------------------------------------------ parsing
def _check_value(cls_name: str, name: str, value: Any, where: str) -> None:
    if name == "method" and value not in METHODS:
        raise ConfigError(f"{where}.method={value!r}: choose one of {', '.join(METHODS)}")
    if name == "bits" and value not in SUPPORTED_BITS:
        raise ConfigError(f"{where}.bits={value!r} is not supported; choose one of {SUPPORTED_BITS}")
    if name == "group_size":
        ok_int = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or value == -1)
        if not ok_int and value not in ("channel", "tensor"):
            raise ConfigError(f"{where}.group_size={value!r} must be a positive integer, "
                              f"'channel' (or -1) or 'tensor'")
    if name == "clip" and value not in ("minmax", "mse"):
        raise ConfigError(f"{where}.clip={value!r}: choose minmax or mse")
    if name == "scale_dtype" and value not in SCALE_DTYPES:
        raise ConfigError(f"{where}.scale_dtype={value!r}: choose one of {', '.join(SCALE_DTYPES)}")
    if name in ("outlier_fraction", "sensitive_fraction") and not 0 <= value < 1:
        raise ConfigError(f"{where}.{name}={value!r} must be in [0, 1)")
    if name in ("block_size", "grid", "clip_grid", "clip_tokens", "search_samples", "kmeans_iters") \
            and value <= 0:
        raise ConfigError(f"{where}.{name}={value!r} must be positive")
    if name == "kmeans_init" and value not in KMEANS_INITS:
        raise ConfigError(f"{where}.kmeans_init={value!r}: choose {' or '.join(KMEANS_INITS)}")
    if name == "sink_weight" and not value >= 1:
        raise ConfigError(f"{where}.sink_weight={value!r} must be at least 1 (1: the published GPTQ)")
    if name in ("damp", "max_damp") and value < 0:
        raise ConfigError(f"{where}.{name}={value!r} must be non-negative")


def from_dict(cls, data: dict | None, where: str):
    """A (nested) frozen dataclass from a mapping; unknown keys and wrong types are errors."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
            continue
        if hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}.{name}={value!r} must be true or false")
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if hint in (int, float) and (not isinstance(value, hint) or isinstance(value, bool)):
            raise ConfigError(f"{where}.{name}={value!r} must be {'an integer' if hint is int else 'a number'}")
        if hint is str and not isinstance(value, str):
            raise ConfigError(f"{where}.{name}={value!r} must be a string")
        _check_value(cls.__name__, name, value, where)
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_weights(section: dict, where: str = "weights") -> WeightsConfig:
    """Validates a `weights:` section (every rule's overrides included)."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping")
    section = dict(section)
    targets = section.pop("targets", DEFAULT_TARGETS)
    raw_rules = section.pop("rules", None) or []
    layer = from_dict(LayerConfig, section, where)
    _compile(targets, f"{where}.targets")
    if layer.method == "squeezellm" and layer.group_size not in ("channel", -1):
        raise ConfigError(f"{where}: squeezellm builds one codebook per output channel; "
                          f"set group_size: channel (got {layer.group_size!r})")
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{where}.rules must be a list of {{pattern, overrides | skip}}")
    rules = []
    for i, raw in enumerate(raw_rules):
        rw = f"{where}.rules[{i}]"
        rule = from_dict(Rule, raw, rw)
        _compile(rule.pattern, f"{rw}.pattern")
        if rule.skip and rule.overrides:
            raise ConfigError(f"{rw}: give either skip: true or overrides, not both")
        if rule.overrides is not None and not isinstance(rule.overrides, dict):
            raise ConfigError(f"{rw}.overrides must be a mapping such as {{bits: 8}}")
        if not rule.skip and not rule.overrides:
            raise ConfigError(f"{rw}: a rule needs overrides: {{...}} or skip: true")
        if rule.overrides:
            over = rule_layer(layer, rule, rw)
            if over.method not in ("rtn", layer.method):
                raise ConfigError(f"{rw}: method {over.method} cannot be mixed with the recipe's method "
                                  f"{layer.method}; a rule may switch a layer to rtn only")
        rules.append(rule)
    return WeightsConfig(layer=layer, targets=targets, rules=tuple(rules))


def rule_layer(base: LayerConfig, rule: Rule, where: str) -> LayerConfig:
    layer = from_dict(LayerConfig, _merge(to_dict(base), rule.overrides), f"{where}.overrides")
    if layer.method == "squeezellm" and layer.group_size not in ("channel", -1):
        raise ConfigError(f"{where}: squeezellm needs group_size: channel")
    return layer


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ConfigError(f"{where}={pattern!r} is not a valid regular expression ({e})") from None


BLOCK_LINEAR = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.kernel")


def resolve_policy(paths: Iterable[str], weights: WeightsConfig,
                   shapes: dict[str, tuple] | None = None) -> dict[str, LayerConfig]:
    """{path: LayerConfig} for every parameter the recipe quantizes (others stay dense).

    The first rule whose pattern fully matches a path decides (skip, or the overrides);
    a path no rule matches is quantized with the base config when `targets` matches it.
    Checks that every chosen leaf is a 2-D weight and that calibrated methods only target
    decoder-block projections (their inputs are what the calibration engine taps).
    """
    targets = re.compile(weights.targets)
    rules = [(re.compile(r.pattern), r) for r in weights.rules]
    layers = {i: rule_layer(weights.layer, r, f"weights.rules[{i}]")
              for i, (_, r) in enumerate(rules) if r.overrides}
    policy = {}
    for path in paths:
        chosen = None
        for i, (pattern, rule) in enumerate(rules):
            if pattern.fullmatch(path):
                chosen = None if rule.skip else layers[i]
                break
        else:
            if targets.fullmatch(path):
                chosen = weights.layer
        if chosen is None:
            continue
        if shapes is not None and len(shapes[path]) != 2:
            raise ConfigError(f"{path}: has shape {shapes[path]}, only 2-D weights can be quantized; "
                              f"exclude it from weights.targets / rules")
        if chosen.method in CALIBRATED and not BLOCK_LINEAR.fullmatch(path):
            raise ConfigError(f"{path}: {chosen.method} needs the inputs of a decoder-block projection; "
                              f"quantize it with a rule `overrides: {{method: rtn}}` or skip it")
        if shapes is not None:
            chosen.group_for(shapes[path][0], path)  # bad bits / group size: fail before any work
        policy[path] = chosen
    return policy
