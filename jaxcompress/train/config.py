"""Training configs: frozen, typed dataclasses read from YAML (`configs/train/*.yaml`).

Every section is a dataclass; an unknown key anywhere is a `ConfigError` that names the key and
lists the allowed ones; a value of the wrong type names its key too. `--set a.b=value`
overrides any value before parsing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from jaxcompress.errors import ConfigError

MODES = ("lora", "qlora", "qat", "full")
# Every projection of every decoder layer.
ALL_PROJECTIONS = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.kernel"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: Union[str, list] = ALL_PROJECTIONS


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The weight grid: the QLoRA base (when `recipe` is not given) and the QAT grid."""

    bits: int = 4
    group_size: Union[int, str] = 128  # rows per group, or channel (-1) / tensor
    symmetric: bool = False
    clip: str = "minmax"             # minmax | mse (start grid of qat fixed/learned, QLoRA base)
    scale_dtype: str = "float16"
    targets: Union[str, list] = ALL_PROJECTIONS

    def layer(self):
        """The grid as the quantizers' `LayerConfig` (validated there)."""
        from jaxcompress.quant.config import LayerConfig, from_dict

        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "targets"}
        return from_dict(LayerConfig, fields, "quant")


@dataclasses.dataclass(frozen=True)
class QatConfig:
    scales: str = "minmax"           # minmax | fixed | learned (see train/qat.py)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source. kind=instruct: json/jsonl of instruction/input/output or `messages`;
    kind=text: plain text (name c4 / c4_validation / wikitext2 from the data folder, or a
    .txt/.jsonl path). `skip` drops the first records (e.g. the C4 documents that the C4
    perplexity evaluation reads), then `max_examples` keeps the next N."""

    kind: str = "instruct"
    name: str | None = None          # alpaca | c4 | c4_validation | wikitext2 (files in the data folder)
    path: str | None = None          # or an explicit file
    max_examples: int | None = None  # first N examples / documents (after `skip`)
    skip: int = 0                    # records / documents dropped from the start of the file


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: list = dataclasses.field(default_factory=lambda: [SourceConfig(name="alpaca")])
    seq_len: int = 512
    packing: bool = True
    eval_examples: int = 32          # held out (after the seeded shuffle), evaluated every eval_every
    template: str = "auto"           # auto (chat template if the tokenizer has one) | chat | alpaca
    tokenizer: str | None = None     # None: the model's; "bytes": byte-level ChatML; or an HF folder
    data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    schedule: str = "cosine"         # cosine | linear | constant (each after a linear warmup)
    warmup_steps: int = 0
    end_lr_ratio: float = 0.0        # final lr = lr * end_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accum_steps: int = 1             # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (-1: all remaining devices) and logical-axis rules: [logical, mesh axis or
    list of axes or null]. Parameters and batches name logical axes (see train/sharding.py)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: list = dataclasses.field(default_factory=lambda: [
        ["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["heads", "tensor"], ["kv_heads", "tensor"],
        ["mlp", "tensor"], ["vocab", "tensor"]])


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0                   # steps between checkpoints (0: only the last step)
    keep: int = 2                    # the last k
    keep_best: bool = True           # and the one with the lowest eval loss
    resume: bool = True              # continue from the latest checkpoint in OUT/checkpoints


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10                  # steps between logged training scalars
    eval_every: int = 100            # steps between held-out evaluations (0: only at the end)
    eval_batches: int | None = None  # None: the whole held-out set
    sample_every: int = 0            # steps between generated text samples (0: never)
    sample_prompts: list = dataclasses.field(default_factory=lambda: ["Give three tips for staying healthy."])
    max_new_tokens: int = 32
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mode: str = "lora"
    model: str = "smollm2-135m"
    recipe: str | None = None        # weight recipe applied before training (QLoRA base, QAT start)
    recipe_overrides: list = dataclasses.field(default_factory=list)
    seed: int = 0
    steps: int | None = None         # optimizer steps; or
    epochs: float | None = None      # passes over the packed training rows
    batch_size: int = 8              # sequences per micro-batch, global (all devices, all hosts)
    compute_dtype: str = "auto"      # auto: bfloat16 on GPU, float32 on CPU
    param_dtype: str = "auto"        # storage of the frozen weights (trainable ones are fp32)
    trainable: Union[str, list, None] = None  # extra trainable parameters (regex over names)
    # What OUT/final holds, any of: merged (adapters folded in; QLoRA re-quantized onto the
    # base grid; QAT exported as QArrays), model (the trained tree as is: LoRA over its base),
    # adapters (PEFT layout). None: lora/qat/full -> [merged], qlora -> [model].
    save: Union[list, None] = None
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    qat: QatConfig = QatConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        for item in self.save or ():
            _choice("save[]", item, ("merged", "model", "adapters"))
        _choice("optim.schedule", self.optim.schedule, ("cosine", "linear", "constant"))
        _choice("data.template", self.data.template, ("auto", "chat", "alpaca"))
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("set exactly one of `steps` and `epochs`")
        for key, value in (("steps", self.steps), ("batch_size", self.batch_size),
                           ("data.seq_len", self.data.seq_len), ("optim.accum_steps", self.optim.accum_steps)):
            if value is not None and value <= 0:
                raise ConfigError(f"{key}={value} must be positive")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs={self.epochs} must be positive")
        if "adapters" in (self.save or ()) and self.mode not in ("lora", "qlora"):
            raise ConfigError(f"save: adapters needs LoRA; mode {self.mode!r} has none")
        for i, src in enumerate(self.data.sources):
            _choice(f"data.sources[{i}].kind", src.kind, ("instruct", "text"))
            if (src.name is None) == (src.path is None):
                raise ConfigError(f"data.sources[{i}]: set exactly one of `name` and `path`")
            if src.skip < 0:
                raise ConfigError(f"data.sources[{i}].skip={src.skip} must be >= 0")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")


# ------------------------------------------------------------------------------ parsing
def _check_type(key: str, value, hint):
    """Returns value converted to `hint` (ints for floats, YAML's '2e-4' strings) or raises."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if value is not None else errors[0]
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r} must be null")
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 2e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if hint is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}={value!r} must be a list")
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    raise TypeError(f"unhandled config type {hint} for {key}")


def parse(cls, data: dict | None, where: str = ""):
    """An instance of the config dataclass `cls` from a (YAML) dict; strict about keys."""
    if isinstance(data, cls):
        return data
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; allowed in "
                          f"{where or 'the top level'}: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _check_type(key, value, hints[name])
    if cls is DataConfig and "sources" in kwargs:
        kwargs["sources"] = [parse(SourceConfig, s, f"data.sources[{i}]") for i, s in enumerate(kwargs["sources"])]
        if not kwargs["sources"]:
            raise ConfigError("data.sources is empty: name at least one source")
    return cls(**kwargs)


def load_config(path: str | None, overrides: list[str] | None = None, mode: str | None = None) -> TrainConfig:
    """Reads a YAML train config, applies `--set` overrides and the CLI's mode."""
    from jaxcompress.overrides import apply_overrides, load_yaml

    raw = load_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [], strict=False, name=path or "config")
    if mode is not None:
        if raw.get("mode") not in (None, mode):
            raise ConfigError(f"{path}: the config is for mode {raw['mode']!r}, not {mode!r}; "
                              f"run `jaxcompress train {raw['mode']}` or change `mode`")
        raw["mode"] = mode
    return parse(TrainConfig, raw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
