"""Train configs: strict keys and types, overrides, the shipped configs, and the schedule."""

import glob
import os

import numpy as np
import pytest

from jaxcompress.errors import ConfigError
from jaxcompress.train.config import TrainConfig, load_config, parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key lerning_rate; allowed in the top level: mode, model"):
        load_config(write(tmp_path, "steps: 3\nlerning_rate: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown config key optim.lrr; allowed in optim: lr, schedule"):
        load_config(write(tmp_path, "steps: 3\noptim: {lrr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"unknown config key data.sources\[1\].file"):
        load_config(write(tmp_path, "steps: 3\ndata: {sources: [{name: alpaca}, {file: x.json}]}\n"))
    with pytest.raises(ConfigError, match="unknown config key lora.rnak"):
        load_config(None, ["steps=3", "lora.rnak=4"])


def test_types_and_values(tmp_path):
    cfg = load_config(write(tmp_path, "steps: 3\noptim: {lr: 2e-4, warmup_steps: 1}\nlora: {alpha: 16}\n"))
    assert cfg.optim.lr == 2e-4 and cfg.lora.alpha == 16.0  # YAML reads 2e-4 as a string
    with pytest.raises(ConfigError, match="lora.rank='big' must be an integer"):
        load_config(None, ["steps=3", "lora.rank=big"])
    with pytest.raises(ConfigError, match="data.packing=3 must be true or false"):
        load_config(None, ["steps=3", "data.packing=3"])
    with pytest.raises(ConfigError, match="set exactly one of `steps` and `epochs`"):
        parse(TrainConfig, {"steps": 3, "epochs": 1.0})
    with pytest.raises(ConfigError, match="mode='sft': choose one of lora, qlora, qat, full"):
        parse(TrainConfig, {"steps": 3, "mode": "sft"})
    with pytest.raises(ConfigError, match="save: adapters needs LoRA; mode 'qat' has none"):
        parse(TrainConfig, {"steps": 3, "mode": "qat", "save": ["adapters"]})
    with pytest.raises(ConfigError, match=r"quant.bits=7 is not supported"):
        parse(TrainConfig, {"steps": 3, "quant": {"bits": 7}}).quant.layer()


def test_cli_mode_must_match_the_config(tmp_path):
    path = write(tmp_path, "mode: qat\nsteps: 3\n")
    assert load_config(path, mode="qat").mode == "qat"
    with pytest.raises(ConfigError, match="the config is for mode 'qat', not 'lora'"):
        load_config(path, mode="lora")


def test_shipped_configs_parse():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml")))
    assert any(p.endswith("lora_smoke.yaml") for p in paths)
    for path in paths:
        cfg = load_config(path)
        cfg.quant.layer()  # the grid is valid too


def test_schedule_warmup_then_cosine():
    from jaxcompress.train.trainer import make_schedule

    optim = parse(TrainConfig, {"steps": 10, "optim": {"lr": 1.0, "warmup_steps": 4, "end_lr_ratio": 0.1}}).optim
    sched = make_schedule(optim, 10)
    got = np.asarray([float(sched(s)) for s in range(11)])
    want = [s / 4 for s in range(4)] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - 4) / 6)) for s in range(4, 11)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    linear = make_schedule(parse(TrainConfig, {"steps": 4, "optim": {"lr": 2.0, "schedule": "linear"}}).optim, 4)
    np.testing.assert_allclose([float(linear(s)) for s in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0], atol=1e-7)
