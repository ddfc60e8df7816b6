"""Imports every module that registers evaluation tasks (the registry loads this lazily)."""

from jaxcompress.eval import gsm8k, humaneval, longcontext, mmlu, mtbench, zeroshot  # noqa: F401
