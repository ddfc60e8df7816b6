"""Recovery training: LoRA / QLoRA / QAT / full fine-tuning with one optax trainer.

Importing this package registers the `LoRA` and `FakeQuant` leaf types (their `linear()`
paths and checkpoint restore), so trained checkpoints load wherever it is imported.

    from jaxcompress.train import load_config, run_training
    record = run_training(load_config("configs/train/lora_smoke.yaml"), "runs/smoke")
"""

from jaxcompress.train.config import TrainConfig, load_config
from jaxcompress.train.lora import LoRA, add_lora, load_adapters, merge_lora, save_adapters, unmerge_lora
from jaxcompress.train.qat import FakeQuant, add_fake_quant, finalize_qat, requantize_like


def run_training(*args, **kwargs):
    """See `jaxcompress.train.run.run_training` (imported lazily: it pulls in orbax and tensorboard)."""
    from jaxcompress.train.run import run_training as run

    return run(*args, **kwargs)


__all__ = ["TrainConfig", "load_config", "run_training", "LoRA", "add_lora", "merge_lora", "unmerge_lora",
           "save_adapters", "load_adapters", "FakeQuant", "add_fake_quant", "finalize_qat", "requantize_like"]
