"""HumanEval: complete 164 Python functions; a completion passes when the problem's tests run
without error in the sandbox (jaxcompress.eval.sandbox; never in this process).

`pass@1` is greedy decoding (one completion per problem). With `--task-opt samples=N` (N >= k),
N completions per problem are also sampled (temperature 0.8, top-p 0.95 unless set) and
pass@k for k in (1, 10, 100) up to N is the unbiased estimator of Chen et al. (2021), averaged
over problems. Generation stops at the Codex stop sequences (a new top-level statement).

The programs run only with the full isolation (network/PID/mount namespaces) unless
`--task-opt sandbox=audit-hook` accepts the weaker mode; the mode is recorded in the result.
`timeout_s` (default 10) is each program's wall-clock limit.
"""

from __future__ import annotations

import gzip
import json

from jaxcompress.data.paths import data_path
from jaxcompress.eval.generation import encode_text, generate_batched
from jaxcompress.eval.metrics import mean_stderr, pass_at_k
from jaxcompress.eval.registry import TaskOptions, register_task
from jaxcompress.eval.runner import map_chunks
from jaxcompress.eval.sandbox import Limits, check_programs, humaneval_program, require

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 512
CHUNK_PROBLEMS = 41  # 164 = 4 chunks


def load(data_dir=None) -> list[dict]:
    with gzip.open(data_path("humaneval", "HumanEval.jsonl.gz", data_dir=data_dir), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _limits(opts: TaskOptions) -> Limits:
    timeout = float(opts.extra.get("timeout_s", 10.0))
    return Limits(timeout_s=timeout, cpu_s=max(1, int(timeout)))


@register_task("humaneval")
def humaneval_task(loaded, opts: TaskOptions) -> dict:
    problems = load(opts.data_dir)
    problems = problems if opts.limit is None else problems[:opts.limit]
    n = int(opts.extra.get("samples", 0))
    temperature = float(opts.extra.get("temperature", 0.8))
    top_p = float(opts.extra.get("top_p", 0.95))
    max_new = int(opts.extra.get("max_new_tokens", MAX_NEW_TOKENS))
    seed = int(opts.extra.get("seed", 0))
    limits = _limits(opts)
    # Refuse before any generation when generated code cannot be isolated here (SandboxError).
    mode = require(str(opts.extra.get("sandbox", "namespaces")))
    # A canonical solution must pass: a sandbox that fails everything would read as 0%.
    if not check_programs([humaneval_program(problems[0], problems[0]["canonical_solution"])], limits)[0].passed:
        raise RuntimeError(f"the sandbox ({mode} mode) fails the canonical solution of "
                           f"{problems[0]['task_id']}; fix the sandbox before trusting pass@k")

    # Every batch padded to the longest prompt of the task: one program for greedy decoding, one
    # for sampling.
    longest = max(len(encode_text(loaded.tokenizer, p["prompt"])) for p in problems)

    def run(chunk, start):
        prompts = [encode_text(loaded.tokenizer, p["prompt"]) for p in chunk]
        greedy = generate_batched(loaded, prompts, max_new_tokens=max_new, stop=STOP,
                                  batch_tokens=opts.extra.get("batch_tokens"), min_length=longest,
                                  desc=f"humaneval greedy {start + len(chunk)}/{len(problems)}")
        passed = [o.passed for o in check_programs([humaneval_program(p, c) for p, c in zip(chunk, greedy)],
                                                   limits)]
        rows = [{"task_id": p["task_id"], "greedy_passed": ok, "completion": c}
                for p, c, ok in zip(chunk, greedy, passed)]
        if n:
            repeated = [pr for pr in prompts for _ in range(n)]
            samples = generate_batched(loaded, repeated, max_new_tokens=max_new, stop=STOP,
                                       temperature=temperature, top_p=top_p, seed=seed + 7919 * start,
                                       batch_tokens=opts.extra.get("batch_tokens"), min_length=longest,
                                       desc=f"humaneval samples {start + len(chunk)}/{len(problems)}")
            programs = [humaneval_program(chunk[i // n], s) for i, s in enumerate(samples)]
            ok = [o.passed for o in check_programs(programs, limits)]
            for j, row in enumerate(rows):
                row["correct"] = int(sum(ok[j * n:(j + 1) * n]))
        return rows

    per_problem = map_chunks("humaneval", problems, run, int(opts.extra.get("chunk_size", CHUNK_PROBLEMS)))
    p1, p1_err = mean_stderr([float(r["greedy_passed"]) for r in per_problem])
    out = {"n": len(per_problem), "pass@1": p1, "pass@1_stderr": p1_err, "sandbox": mode,
           "examples": [{"task_id": r["task_id"], "completion": r["completion"]} for r in per_problem[:2]]}
    if n:
        out.update({"samples": n, "temperature": temperature, "top_p": top_p})
        for k in (1, 10, 100):
            if k <= n:
                out[f"pass@{k}_sampled" if k == 1 else f"pass@{k}"] = float(
                    sum(pass_at_k(n, r["correct"], k) for r in per_problem) / len(per_problem))
    return out
