"""Where one end-to-end decode step spends its device time, kernel by kernel.

    python scripts/profile_decode.py --model random:llama2-7b --recipes ,kivi_k2v2,kivi_k2v2_w4 \\
        --context 32768 --steps 8 --out /tmp/profile

For each recipe ('' = the bf16 model and cache) it builds the decode loop `bench_kv.py --e2e`
times (jaxcompress.kv.bench.e2e_setup), runs it once to compile, once under `jax.profiler`,
and sums the device time of each kernel. It also reads the run as a timeline: the time no
kernel covers (the device waiting on the host) and which kernels those gaps came before, which
is where a step whose wall time exceeds its kernels' sum loses it. Writes
`<out>/profile_<recipe>.json` (every op, the timeline) and `.md` (the top ops and gaps per decode
step), and with --hlo the optimized HLO (gzip), to map XLA's fusion names back to the model's
operations.

With --attention it profiles one layer's decode attention instead (the variants `bench_kv.py`
times: the codec's path and, for packed codecs, the kernel alone), `--steps` calls in one
jitted loop, at Llama-2-7B head shapes (--model names a preset then). XLA's command buffers (CUDA
graphs) are turned off for the profile by default, so the total is a little above the wall time
`bench_kv.py --e2e` measures. --command-buffers keeps them, and has XLA run them as graphs under the
profiler too (`--xla_enable_command_buffers_during_profiling`; XLA otherwise runs their kernels one
by one while profiling): the kernels appear the same, but the host's time between graphs shows up
much inflated (kv_notes run 20). The profiled loop donates its cache as
`bench_kv.py --e2e` does: the profiled run continues from the cache the warm-up run left. (Until
kv_notes run 19 it reused one cache, so XLA copied it once a run: the `MemcpyD2D` rows of older tables.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def attention_loop(model: str, recipe: str, batch: int, context: int, calls: int):
    """(run, args, name): `calls` decode-attention calls of one layer in one jitted loop; recipe
    'name' or 'name/kernel-only' (a kv_cache recipe), '' = XLA bf16 attention."""
    import jax
    import jax.numpy as jnp

    from jaxcompress.kv.bench import attend_fn, attention_calls, filled_layer
    from jaxcompress.models.presets import preset
    from scripts.bench_kv import codec_for

    cfg = preset(model.removeprefix("random:"))
    codec_name, _, variant = recipe.partition("/")
    inputs = filled_layer(cfg, codec_for(codec_name, cfg) if codec_name else None, batch, context)
    fn = attend_fn(inputs, cfg, variant or ("codec" if codec_name else "xla-bf16"))
    q = jax.random.normal(jax.random.key(1), (batch, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    run, qs = attention_calls(fn, q, calls)
    return run, (inputs.state, qs), (recipe or "xla-bf16").replace("/", "-")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--recipes", default=",kivi_k2v2", help="comma-separated recipes; '' = bf16; as in bench_kv.py "
                   "--e2e-recipes (name@section.key=value, a trailing +fused, then +wgmma)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="decode steps in the profiled run")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--attention", action="store_true", help="profile one layer's decode attention")
    p.add_argument("--hlo", action="store_true", help="also write the optimized HLO of each run")
    p.add_argument("--command-buffers", action="store_true",
                   help="keep XLA's CUDA command buffers (graphs), run as graphs under the profiler too "
                        "(the idle gaps between them come out inflated); by default they are turned off")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    # before jax starts its backend
    flag = ("--xla_enable_command_buffers_during_profiling=true" if args.command_buffers
            else "--xla_gpu_enable_command_buffer=")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    import jax

    from jaxcompress.bench.profile import idle_gaps, op_table, profile_run, summarize, summarize_idle
    from jaxcompress.io.atomic import write_json, write_text
    from jaxcompress.kv.bench import e2e_setup

    os.makedirs(args.out, exist_ok=True)
    for recipe in args.recipes.split(","):
        name = recipe or "bf16"
        t0 = time.time()
        if args.attention:
            run, run_args, name = attention_loop(args.model, recipe, args.batch, args.context, args.steps)
        else:
            _, step_fn = e2e_setup(args.model, recipe or None, args.batch, args.steps)
            run, run_args = step_fn(args.context, donate=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)  # "kivi_k2v2@kv_cache.x=y+fused" -> a plain file name
        if args.hlo:  # before the profile consumes the donated cache
            with gzip.open(os.path.join(args.out, f"hlo_{stem}.txt.gz"), "wt") as f:
                f.write(run.lower(*run_args).compile().as_text())
        events = profile_run(run, *run_args, carried=not args.attention)
        rows, timeline = op_table(events), idle_gaps(events)
        meta = {"model": args.model, "recipe": name, "attention_only": args.attention, "context": args.context, "batch": args.batch,
                "steps": args.steps, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                "commit": os.environ.get("JAXCOMPRESS_GIT_COMMIT", "")}
        write_json(os.path.join(args.out, f"profile_{stem}.json"), {**meta, "ops": rows, "timeline": timeline})
        table = summarize(rows, args.steps, args.top) + "\n\n" + summarize_idle(timeline, args.steps)
        write_text(os.path.join(args.out, f"profile_{stem}.md"),
                   f"# Decode step profile: {name}\n\n{json.dumps(meta)}\n\n{table}\n")
        print(f"== {name} ({time.time() - t0:.0f} s)\n{table}\n", flush=True)
        del run, run_args


if __name__ == "__main__":
    main()
