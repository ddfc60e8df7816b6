"""Which kernels of the served decode step XLA runs inside command buffers (CUDA graphs).

    python scripts/gpu/command_buffers.py --recipes ,kivi_k2v2,kivi_k2v2@kv_cache.values_pass=wgmma \\
        --context 4096 --out /tmp/cb

kv_notes run 26 found the served step with the tensor-core (Mosaic GPU) values pass about 6 us a
layer slower than its kernels' sum predicts, and guessed that XLA's command buffers break at the
Mosaic GPU custom call. This compiles the step `bench_kv.py --e2e` times (`e2e_setup`, XLA's
flags as the environment sets them) and reads the optimized HLO: for every computation that runs
kernels (the entry, the decode loop's body, the flush conditional's branches) how many command
buffers it calls, and which kernels it launches outside them; and what the command buffers hold.
The HLO is written gzipped beside the summary. The structure does not depend on the context
length, so a short one compiles faster.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CALLEE = re.compile(r"to_apply=%?([\w.\-]+)")


def _kind(line: str) -> str | None:
    """The kernel-launching kind of one HLO instruction, or None."""
    if " custom-call(" in line:
        m = _TARGET.search(line)
        return "custom-call " + (m.group(1) if m else "?")
    for op in ("fusion", "while", "conditional", "copy-start", "copy"):
        if f" {op}(" in line:
            return op
    return None


def computations(hlo: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines}, from an HLO module's text."""
    out, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            name = m.group(1) if m else None
            if name:
                out[name] = []
        elif name and line.startswith("  "):
            out[name].append(line)
    return out


def summary(hlo: str) -> dict:
    """{"outside": {computation: Counter of kinds launched outside command buffers, plus
    "command buffers": calls}, "inside": Counter of kinds inside all command buffers}."""
    comps = computations(hlo)
    buffers = {n for n in comps if n.startswith("command_buffer")}
    inside, outside = collections.Counter(), {}
    for name, lines in comps.items():
        kinds = collections.Counter()
        for line in lines:
            callee = _CALLEE.search(line)
            if " call(" in line and callee and callee.group(1) in buffers:
                kinds["command buffers"] += 1
            elif (k := _kind(line)) is not None:
                kinds[k] += 1
        if name in buffers:
            inside.update(kinds)
        elif kinds:  # the entry, a loop body, a conditional's branch (fusion bodies launch nothing)
            outside[name] = kinds
    return {"outside": outside, "inside": inside}


def render(name: str, s: dict) -> str:
    lines = [f"== {name}", "  inside command buffers: " +
             ", ".join(f"{k} x{v}" for k, v in sorted(s["inside"].items()))]
    for comp, kinds in s["outside"].items():
        lines.append(f"  outside, in {comp}: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--recipes", default=",kivi_k2v2,kivi_k2v2@kv_cache.values_pass=wgmma")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from jaxcompress.kv.bench import e2e_setup

    os.makedirs(args.out, exist_ok=True)
    print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""), flush=True)
    for recipe in args.recipes.split(","):
        name = recipe or "bf16"
        _, step_fn = e2e_setup(args.model, recipe or None, args.batch, args.steps)
        run, run_args = step_fn(args.context, donate=True)
        hlo = run.lower(*run_args).compile().as_text()
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        with gzip.open(os.path.join(args.out, f"hlo_{stem}.txt.gz"), "wt") as f:
            f.write(hlo)
        print(render(name, summary(hlo)), flush=True)
        del run, run_args


if __name__ == "__main__":
    main()
