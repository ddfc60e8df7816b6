"""Recovery: how much of a quantized model's WikiText-2 perplexity gap does LoRA win back?

    # GPU: SmolLM2-135M, W3 g128 (RTN) base, LoRA r16 on Alpaca + C4 (the recorded run: scripts/gpu/train.sh)
    PYTHONPATH=. python scripts/train_recovery.py --config configs/train/recovery_w3_r16.yaml --out runs/rec16
    # GPTQ base: add --set recipe=gptq_w3_g128 ; other ranks: qlora_w3_r8.yaml / qlora_w3_r32.yaml
    # CPU smoke run (a minute): random:tiny, byte tokenizer, a few steps, short windows
    PYTHONPATH=. python scripts/train_recovery.py --tiny --out /tmp/rec

Measures WikiText-2 test perplexity (the GPTQ protocol, `--seqlen`, default 2048; in
`--eval-dtype`, default float32, the dtype of docs/results/quant) of
  1. the dense model,  2. the model after the config's weight recipe (the frozen QLoRA base),
  3. the trained model as it runs (quantized base + LoRA adapters: OUT/run/final/model),
  4. the adapters merged and re-quantized onto the base grid (deployable: OUT/run/final/merged),
and reports the fraction of the gap recovered, (ppl_q - ppl_lora) / (ppl_q - ppl_dense). Writes
OUT/recovery.json (rewritten after each stage, `complete: false` until the end), OUT/recovery.md
and OUT/recovery_curve.png (train and held-out loss, held-out perplexity); the run's TensorBoard
events are in OUT/run/tensorboard. The quantized model is built once (from the eval-dtype
weights) and trained with the config's compute dtype, so the perplexity "before" is of the exact
base that is trained. `--train-seconds` caps the training loop's wall clock (see run_training).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_OVERRIDES = ["model=random:tiny", "data.tokenizer=bytes", "steps=6", "epochs=null", "batch_size=4",
                  "data.seq_len=64", "data.eval_examples=8",
                  "data.sources=[{kind: instruct, name: alpaca, max_examples: 64}, "
                  "{kind: text, name: c4, max_examples: 16}]",
                  "log.every=1", "log.eval_every=3", "log.sample_every=0", "checkpoint.every=0",
                  "log.progress=false", "recipe_overrides=[weights.group_size=32]", "optim.lr=1e-2",
                  "compute_dtype=float32", "param_dtype=float32"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wikitext_ppl(loaded, tokens, seqlen: int, limit: int | None, batch_size: int) -> dict:
    from jaxcompress.eval.perplexity import perplexity

    t0 = time.perf_counter()
    out = perplexity(loaded, tokens, seqlen=seqlen, limit=limit, batch_size=batch_size, progress=False)
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def plot_curve(log_path: str, png: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcompress.train.logs import read_json_log

    entries = read_json_log(log_path)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for tag, style in (("train/loss", "-"), ("eval/loss", "o-")):
        points = [(e["step"], e[tag]) for e in entries if tag in e]
        if points:
            ax.plot(*zip(*points), style, label=tag)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    ax.grid(alpha=0.3)
    points = [(e["step"], e["eval/ppl"]) for e in entries if "eval/ppl" in e]
    if points:
        ax2.plot(*zip(*points), "o-", color="C1")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("held-out perplexity")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


LABELS = {"dense": "dense", "quantized": "{recipe}", "lora": "{recipe} + LoRA (as trained)",
          "lora_requantized": "LoRA merged, re-quantized to the base grid"}


def markdown(result: dict) -> str:
    ppl, rec = result["wikitext2_ppl"], result.get("gap_recovered") or {}
    run = result.get("training") or {}
    lines = [f"WikiText-2 test perplexity, seqlen {result['seqlen']}, {result['windows']} windows, "
             f"eval dtype {result['eval_dtype']}; {result['model']}, base {result['recipe']}, "
             f"LoRA r{result['lora_rank']}, training compute {result['train_dtype']} "
             f"({result['device']}, jax {result['versions'].get('jax')}, commit {result['git_commit']})", ""]
    if run:
        lines += [f"Training: {run.get('steps_done')} of {run.get('steps_planned')} planned steps, "
                  f"batch {run.get('batch_size')} x seq {run.get('seq_len')}, {run.get('tokens_seen'):,} tokens, "
                  f"{run.get('training_seconds')} s, of which the first step (compilation) "
                  f"{run.get('first_step_seconds')} s "
                  f"(stopped by the time budget: "
                  f"{run.get('stopped_by_time_budget')}); held-out loss "
                  f"{_fmt(run.get('held_out_before'))} -> {_fmt(run.get('held_out_after'))}", ""]
    lines += ["| model | WikiText-2 ppl | gap recovered | eval s |", "|---|---|---|---|"]
    for key, label in LABELS.items():
        if key in ppl:
            frac = rec.get(key)
            lines.append(f"| {label.format(recipe=result['recipe'])} | {ppl[key]:.3f} | "
                         f"{'' if frac is None else f'{100 * frac:.1f}%'} | {result['ppl_seconds'][key]} |")
    if not result.get("complete"):
        lines += ["", "**Incomplete run**: the stages after the last row did not finish."]
    return "\n".join(lines) + "\n"


def _fmt(ev) -> str:
    return "-" if not ev else f"{ev['loss']:.4f} (ppl {ev['ppl']:.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/train/recovery_w3_r16.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny", action="store_true", help="tiny CPU smoke run (random:tiny, byte tokenizer)")
    p.add_argument("--seqlen", type=int, help="perplexity window (default 2048; 64 with --tiny)")
    p.add_argument("--limit", type=int, help="first N perplexity windows only (default all; 4 with --tiny)")
    p.add_argument("--batch-size", type=int, default=8, help="perplexity windows per batch")
    p.add_argument("--eval-dtype", default="float32", help="dtype of the perplexity evaluations")
    p.add_argument("--train-seconds", type=float, help="wall-clock cap of the training loop")
    p.add_argument("--skip-requantized", action="store_true",
                   help="do not evaluate the merged, re-quantized model (saves one evaluation)")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from jaxcompress.errors import ConfigError
    from jaxcompress.eval.perplexity import wikitext2_tokens
    from jaxcompress.experiments.recipes import apply_recipe, load_recipe
    from jaxcompress.io.atomic import write_json, write_text
    from jaxcompress.io.load import LoadedModel, load_model
    from jaxcompress.provenance import provenance
    from jaxcompress.train.config import load_config, to_dict
    from jaxcompress.train.data import resolve_tokenizer
    from jaxcompress.train.run import run_training
    from jaxcompress.train.trainer import resolve_dtype

    overrides = (TINY_OVERRIDES if args.tiny else []) + args.overrides
    seqlen = args.seqlen or (64 if args.tiny else 2048)
    limit = args.limit if args.limit is not None else (4 if args.tiny else None)
    cfg = load_config(args.config, overrides)
    if not cfg.recipe:
        raise ConfigError(f"{args.config}: recovery needs a weight recipe (set `recipe`)")
    if cfg.mode not in ("lora", "qlora"):
        raise ConfigError(f"{args.config}: recovery measures LoRA adapters; mode is {cfg.mode!r}")
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "recovery.json"), os.path.join(args.out, "recovery.md")

    compute, evaluate_in = resolve_dtype(cfg.compute_dtype), resolve_dtype(args.eval_dtype)
    result = {"complete": False, "model": cfg.model, "recipe": cfg.recipe, "lora_rank": cfg.lora.rank,
              "seqlen": seqlen, "windows": None, "eval_dtype": jnp.dtype(evaluate_in).name,
              "train_dtype": jnp.dtype(compute).name, "wikitext2_ppl": {}, "ppl_seconds": {},
              "gap_recovered": None, "training": None, "config": to_dict(cfg), "tiny": args.tiny,
              "stage_seconds": {}, **provenance()}
    t_start = time.perf_counter()

    def record(key: str, out: dict) -> None:
        result["wikitext2_ppl"][key] = out["ppl"]
        result["ppl_seconds"][key] = out["seconds"]
        result["windows"] = out["windows"]
        ppl = result["wikitext2_ppl"]
        if "dense" in ppl and "quantized" in ppl:
            gap = ppl["quantized"] - ppl["dense"]
            result["gap_recovered"] = {k: (ppl["quantized"] - v) / gap if gap > 0 else None
                                       for k, v in ppl.items() if k not in ("dense", "quantized")}
        result["stage_seconds"][key] = round(time.perf_counter() - t_start, 1)
        write_json(json_path, result)
        write_text(md_path, markdown(result))
        log(f"{key:<17} WikiText-2 ppl {out['ppl']:.3f} ({out['windows']} windows, {out['seconds']} s)")

    log(f"loading {cfg.model} ({result['eval_dtype']})")
    dense = load_model(cfg.model, dtype=evaluate_in, param_dtype=evaluate_in)
    tokenizer = resolve_tokenizer(cfg.data.tokenizer, dense.tokenizer, dense.config.vocab_size)
    dense = LoadedModel(dense.model, tokenizer, dense.spec, dense.fingerprint)
    tokens = wikitext2_tokens(tokenizer, "test", cfg.data.data_dir)
    log(f"WikiText-2 test: {len(tokens):,} tokens")
    record("dense", wikitext_ppl(dense, tokens, seqlen, limit, args.batch_size))
    quantized = apply_recipe(dense, load_recipe(cfg.recipe, list(cfg.recipe_overrides)), data_dir=cfg.data.data_dir)
    del dense
    record("quantized", wikitext_ppl(quantized, tokens, seqlen, limit, args.batch_size))

    # The same quantized tree trains in the compute dtype (the dtype is a static attribute of
    # the model; the weights are not touched).
    quantized.model.dtype = compute
    run_dir = os.path.join(args.out, "run")
    save = sorted(set(cfg.save or []) | {"model"} | (set() if args.skip_requantized else {"merged"}))
    cfg = cfg.__class__(**{**cfg.__dict__, "save": save})
    log(f"training {cfg.mode} r{cfg.lora.rank} ({result['train_dtype']}), budget {args.train_seconds} s")
    rec = run_training(cfg, run_dir, loaded=quantized, time_budget_s=args.train_seconds)
    del quantized
    result["training"] = {"steps_planned": rec["steps"], "steps_done": rec["steps_done"],
                          "stopped_by_time_budget": rec["stopped_by_time_budget"],
                          "training_seconds": rec["training_seconds"], "tokens_seen": rec["tokens_seen"],
                          "first_step_seconds": rec.get("first_step_seconds"),
                          "tokens_per_s_last_window": rec.get("tokens_per_s"), "batch_size": cfg.batch_size,
                          "seq_len": cfg.data.seq_len, "data": rec["data"],
                          "trainable_parameters": rec["trainable_parameters"],
                          "held_out_before": rec.get("eval_before"), "held_out_after": rec.get("eval_after"),
                          "train_loss_last": rec.get("train_loss_last"), "seconds_with_setup": rec["seconds"]}
    result["stage_seconds"]["training"] = round(time.perf_counter() - t_start, 1)
    write_json(json_path, result)
    plot_curve(os.path.join(run_dir, "log.jsonl"), os.path.join(args.out, "recovery_curve.png"),
               f"{cfg.model} {cfg.recipe} + LoRA r{cfg.lora.rank}: {rec['steps_done']} steps")
    log(f"trained {rec['steps_done']} steps in {rec['training_seconds']} s; held-out "
        f"{_fmt(rec.get('eval_before'))} -> {_fmt(rec.get('eval_after'))}")

    for name, folder in (("lora", "model"), ("lora_requantized", "merged")):
        if folder not in save:
            continue
        trained = load_model(os.path.join(run_dir, "final", folder), dtype=evaluate_in)
        trained = LoadedModel(trained.model, tokenizer, trained.spec, trained.fingerprint)
        record(name, wikitext_ppl(trained, tokens, seqlen, limit, args.batch_size))
        del trained
    result["complete"] = True
    write_json(json_path, result)
    text = markdown(result)
    write_text(md_path, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
