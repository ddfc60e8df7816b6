"""Baseline numbers for SmolLM2-135M-Instruct on every evaluation task, with timings.

    PYTHONPATH=. python scripts/eval_baseline.py --out $OUT            # full run (GPU)
    PYTHONPATH=. python scripts/eval_baseline.py --limit 2 --out /tmp/b # smoke run (CPU, minutes)

Writes OUT/baseline_smollm2.json (results, seconds per task, speed targets, published numbers,
provenance) and OUT/baseline_smollm2.md (a table), plus per-task records and the long-context
heatmaps under OUT/raw/. Results are cached (jaxcompress.eval.runner): an interrupted run
resumes. MT-Bench is judged by the model itself unless --judge-url is given (the GPU machine
has no network): such scores are not comparable with GPT-4-judged ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxcompress.eval.registry import TaskOptions  # noqa: E402
from jaxcompress.eval.runner import evaluate  # noqa: E402
from jaxcompress.io.atomic import write_json, write_text  # noqa: E402

TASKS = ["wikitext2", "c4", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "siqa",
         "openbookqa", "copa", "lambada_openai", "mmlu", "gsm8k", "humaneval", "passkey", "needle", "mtbench"]
# Issue 3's speed targets on one H100 (full task, compile included).
SPEED_TARGETS_S = {"wikitext2": 30.0, "hellaswag": 120.0}
# Published numbers for SmolLM2-135M-Instruct, in percent. Other prompts and harnesses, and our
# weights are the Q4_1 GGUF: expect differences of a point or two.
PUBLISHED = {
    "hellaswag": {"metric": "acc_norm", "value": 42.99, "source": "lm-eval 0-shot, third-party model card: "
                  "https://hface.pages.dev/lldois/SmolLM2-135M-Reasoning-SLERP-Champion (baseline column)"},
    "arc_easy": {"metric": "acc", "value": 54.12, "source": "same third-party lm-eval run"},
    "arc_challenge": {"metric": "acc_norm", "value": 27.73, "source": "same third-party lm-eval run"},
    "piqa": {"metric": "acc_norm", "value": 66.92, "source": "same third-party lm-eval run"},
    "gsm8k": {"metric": "exact_match_flexible", "value": 0.38,
              "source": "same third-party lm-eval run (gsm8k, flexible-extract; not 8-shot CoT)"},
    "mmlu": {"metric": "acc", "value": 29.3, "source": "HF model card, MMLU cloze (lighteval; ours is 5-shot "
             "letter choice): recalled, verify before publishing"},
    "mtbench": {"metric": "score", "value": None, "source": "HF model card reports MT-Bench with a GPT-4 judge; "
                "our judge differs, not comparable"},
}


def task_options(task: str, limit: int | None, args) -> TaskOptions:
    smoke = limit is not None
    extra: dict = {}
    if task == "humaneval":
        extra = {"samples": 2 if smoke else args.humaneval_samples, "max_new_tokens": 128 if smoke else 512}
    elif task in ("passkey", "needle"):
        extra = {"lengths": [512, 1024] if smoke else [1024, 2048, 4096, 8192]}
    elif task == "mtbench":
        extra = {"max_new_tokens": 64 if smoke else 1024}
        extra.update({"judge_url": args.judge_url, "judge_model": args.judge_model} if args.judge_url
                     else {"judge_local": "self", "judge_max_new_tokens": 64 if smoke else 512})
    elif task == "gsm8k" and smoke:
        extra = {"max_new_tokens": 64}
    elif task == "mmlu" and smoke:  # 57 subjects of 5-shot prompts are minutes of CPU even at 2 items
        extra = {"subjects": ["abstract_algebra", "anatomy", "astronomy"]}
    windows = min(8, limit) if smoke else 8  # perplexity windows per batch
    return TaskOptions(limit=limit, seqlen=2048, batch_size=windows if task in ("wikitext2", "c4") else 1,
                       data_dir=args.data_dir, extra=extra)


def markdown(record: dict) -> str:
    lines = [f"# SmolLM2-135M-Instruct baseline ({record['model']}, Q4_1 GGUF)", "",
             f"device: {record['device']}; jax {record['versions'].get('jax')}; commit {record['git_commit']}", "",
             "| task | n | metric | ours | published | seconds |", "|---|---|---|---|---|---|"]
    for task, res in record["results"].items():
        pub = PUBLISHED.get(task, {})
        for metric in ("ppl", "acc", "acc_norm", "exact_match", "exact_match_flexible", "pass@1", "pass@10",
                       "score"):
            if metric not in res:
                continue
            value = res[metric]
            shown = f"{value:.3f}" if metric == "ppl" else (f"{100 * value:.2f}" if metric != "score" else f"{value:.2f}")
            published = f"{pub['value']}" if pub.get("metric") == metric and pub.get("value") is not None else ""
            lines.append(f"| {task} | {res.get('n', '')} | {metric} | {shown} | {published} | "
                         f"{record['timing'][task]['seconds']:.1f} |")
    lines += ["", "Accuracies in percent. Published numbers: see `published` in the JSON for sources; they use "
              "other harnesses/prompts and the original bf16 weights (ours: Q4_1 GGUF), so expect small gaps."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, help="first N items of each task (smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir", help="result cache (default: $JAXCOMPRESS_CACHE/eval)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--humaneval-samples", type=int, default=20)
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for MT-Bench (default: the model judges itself)")
    p.add_argument("--judge-model", default="gpt-4")
    args = p.parse_args(argv)

    from jaxcompress.cli import load

    holder: dict = {}

    def load_once():
        if "loaded" not in holder:
            holder["loaded"] = load(argparse.Namespace(model=args.model, dtype=args.dtype, recipe=None,
                                                       overrides=[], data_dir=args.data_dir))
        return holder["loaded"]

    results, timing, last = {}, {}, None
    for task in [t for t in args.tasks.split(",") if t]:
        record = evaluate(load_once, model_spec=args.model, recipe=None, overrides=[], tasks=[task],
                          opts=task_options(task, args.limit, args), out=os.path.join(args.out, "raw", f"{task}.json"),
                          use_cache=not args.no_cache, dtype=args.dtype, cache_dir=args.cache_dir)
        results[task] = record["results"][task]
        timing[task] = record["timing"][task]
        last = record
    speed = {t: {"seconds": timing[t]["seconds"], "target_s": s, "met": timing[t]["seconds"] <= s,
                 "cached": timing[t]["cached"]} for t, s in SPEED_TARGETS_S.items() if t in timing}
    summary = {"model": args.model, "limit": args.limit, "results": results, "timing": timing, "speed_targets": speed,
               "published": PUBLISHED, **{k: last[k] for k in ("versions", "git_commit", "device", "code_version",
                                                                "fingerprint", "dtype")}}
    write_json(os.path.join(args.out, "baseline_smollm2.json"), summary)
    write_text(os.path.join(args.out, "baseline_smollm2.md"), markdown(summary))
    print(json.dumps(speed, indent=1))
    print(f"wrote {os.path.join(args.out, 'baseline_smollm2.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
