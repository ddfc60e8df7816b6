"""`jaxcompress` command line: run, generate, eval, convert, info (+ plug-in subcommands).

A user error (missing file, bad option, corrupt checkpoint) prints one line naming the problem
and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from jaxcompress.errors import UserError

# Modules that add subcommands: each defines `add_commands(subparsers)`.
COMMAND_MODULES: list[str] = ["jaxcompress.train.cli", "jaxcompress.quant.cli"]


def _add_model_args(p: argparse.ArgumentParser, recipe: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), random:<preset>, a .gguf file, an HF or jaxcompress "
                        "checkpoint folder, or a hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute and storage dtype (auto: bfloat16 on GPU, float32 on CPU)")
    if recipe:
        p.add_argument("--recipe", help="compression recipe: a name in configs/recipes or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config or recipe value, e.g. --set calibration.num_samples=32")
    p.add_argument("--data-dir", help="data folder (default: $JAXCOMPRESS_DATA, else ../shared/data)")


def resolve_dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def load(args, recipe_overrides=None):
    """The model named by --model, compressed by --recipe when given."""
    from jaxcompress.io.load import load_model

    dtype = resolve_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype, param_dtype=dtype)
    if getattr(args, "recipe", None):
        from jaxcompress.experiments.recipes import apply_recipe, load_recipe

        recipe = load_recipe(args.recipe, recipe_overrides if recipe_overrides is not None else args.overrides)
        loaded = apply_recipe(loaded, recipe, data_dir=args.data_dir)
    return loaded


# ---------------------------------------------------------------------------------- commands
def cmd_info(args) -> None:
    from jaxcompress.models.build import param_summary

    loaded = load(args)
    cfg = loaded.config
    summary = param_summary(loaded.model)
    print(f"model        {loaded.spec}")
    for key, value in cfg.to_hf_config().items():
        print(f"  {key:<26} {value}")
    print(f"parameters   {summary['parameters']:,}")
    print(f"bytes        {summary['bytes']:,} ({summary['bytes'] / 2**20:.1f} MiB)")
    for kind, nbytes in sorted(summary["bytes_by_kind"].items()):
        print(f"  {kind:<26} {nbytes:,}")
    from jaxcompress.models.cache import IdentityCodec

    codec = loaded.kv_codec or IdentityCodec()
    import jax.numpy as jnp
    per_token = cfg.num_layers * codec.bytes_per_token(cfg.num_kv_heads, cfg.head_dim, loaded.model.dtype)
    print(f"kv cache     {per_token:,.0f} bytes/token ({type(codec).__name__}, "
          f"{jnp.dtype(loaded.model.dtype).name})")


def cmd_generate(args) -> None:
    from jaxcompress.models.generate import generate

    loaded = load(args)
    prompts = args.prompt or ["The capital of France is"]
    outs = generate(loaded, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, stop=args.stop, chat=args.chat, seed=args.seed)
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "completion": out}) if args.json else f"{prompt}{out}")


def cmd_eval(args) -> None:
    from jaxcompress.eval.registry import TaskOptions
    from jaxcompress.eval.runner import evaluate

    extra = {}
    for item in args.task_opt:
        if "=" not in item:
            raise UserError(f"--task-opt {item!r}: expected key=value")
        import yaml
        k, v = item.split("=", 1)
        extra[k] = yaml.safe_load(v)
    opts = TaskOptions(limit=args.limit, seqlen=args.seqlen, batch_size=args.batch_size,
                       data_dir=args.data_dir, extra=extra)
    tasks = [t for t in args.tasks.split(",") if t]
    evaluate(lambda: load(args), model_spec=args.model, recipe=args.recipe, overrides=args.overrides,
             tasks=tasks, opts=opts, out=args.out, use_cache=not args.no_cache, dtype=args.dtype,
             cache_dir=args.cache_dir)


def cmd_convert(args) -> None:
    from jaxcompress.io.checkpoint import save_checkpoint
    from jaxcompress.io.hf import export_hf_folder

    loaded = load(args)
    if args.format == "hf":
        export_hf_folder(loaded.model, args.out, tokenizer=loaded.tokenizer)
    else:
        save_checkpoint(loaded.model, args.out, tokenizer=loaded.tokenizer,
                        extra={"source": loaded.spec, "recipe": loaded.recipe})
    print(f"wrote {args.format} checkpoint to {args.out}")


def cmd_run(args) -> None:
    from jaxcompress.experiments.run import run_config

    run_config(args.config, overrides=args.overrides, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcompress", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run an experiment config (the main job)")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("--out", help="output folder (default: the config's `out`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="generate text")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate on tasks (perplexity, zero-shot, ...)")
    _add_model_args(p)
    p.add_argument("--tasks", default="wikitext2", help="comma-separated task names")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--limit", type=int, help="evaluate the first N windows / items")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. --task-opt num_fewshot=5")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--no-cache", action="store_true", help="recompute finished tasks")
    p.add_argument("--cache-dir", help="result cache folder (default: $JAXCOMPRESS_CACHE/eval, else "
                                       "~/.cache/jaxcompress/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="write the (compressed) model as a checkpoint")
    _add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["jaxcompress", "hf"], default="jaxcompress",
                   help="jaxcompress: orbax checkpoint (keeps compressed leaves); hf: dense safetensors")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="print config, parameter count and bytes")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        if debug:
            raise
        print(f"jaxcompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxcompress: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
