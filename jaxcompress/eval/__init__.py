"""Evaluation: perplexity, zero-shot and few-shot suites, generation tasks, long context, MT-Bench.

Tasks run by name (`jaxcompress eval --tasks ...`, `registry.get_task`); each is
`fn(loaded, TaskOptions) -> dict` and registers with `@register_task`. The pieces:

  scoring     log-likelihood engine (lm-eval encoding, length buckets, shared contexts)
  generation  batched generation with stop strings and chat templates
  metrics     acc / acc_norm, mean and stderr, pass@k, GSM8K answer extraction
  runner      the result cache (resume, --no-cache), provenance, the summary table
  sandbox     running generated code (HumanEval) in an isolated process
  zeroshot, mmlu, gsm8k, humaneval, longcontext, mtbench, perplexity   the tasks
  lm_eval_adapter   `lm_eval --model jaxcompress`

This package's __init__ imports nothing: `lm_eval_hook` runs at interpreter start.
"""
