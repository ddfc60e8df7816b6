"""Instruction counts of a fused matmul kernel's inner loop, on a machine without a GPU.

jax lowers the Pallas kernel for CUDA on any machine (`lowering_platforms=("cuda",)`); the
Triton IR it embeds is compiled here for sm_90 by the `triton` package's own compiler and
`cuobjdump` (shipped in its wheel), and the SASS of each loop is tallied by opcode. That is how
the `dequant="fma"` GEMV was designed (docs/results/kernel_notes.md, "Run 6"): the GPU only
confirms what the count predicts. The pip Triton is not the Triton inside jaxlib, so treat the
counts as close, not exact.

    pip install triton==3.5.0     # any machine; a separate venv is fine (--triton-python); 3.9.0
                                  # failed to parse the IR of jax 0.10.2
    python scripts/kernel_sass.py --bits 4 --group-size 128 --grid asym --dequant fma --acc2d
    python scripts/kernel_sass.py --dequant inplace --acc2d --block-n 128 --warps 8 --sass out.sass
    python scripts/kernel_sass.py --kernel decode --bits 2 --group-size 32 --stages 2  # KV decode, cw2 body (two kernels)
    python scripts/kernel_sass.py --kernel decode --bits 2 --group-size 32 --path cw  # the fp32 cw body
    python scripts/kernel_sass.py --ptx anonymous_0.ptx   # a Mosaic GPU kernel's PTX from the device

Mosaic GPU kernels are compiled to PTX only on the GPU: run them there once with
`MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO=<dir>` and bring the .ptx back; `--ptx` assembles it here
with the same wheel's ptxas (a newer `.version` is lowered to the one that ptxas takes) and tallies
its loops (kv_notes run 21: the wgmma values pass).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from jaxcompress.errors import UserError
from pallas_kernels.layout import kernel_layout
from pallas_kernels.quant_matmul import DEQUANT_MODES, TileConfig, quant_matmul
from pallas_kernels.testing import Variant, random_qarray

COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
k = triton.compile(sys.argv[1], target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=int(sys.argv[2]), num_stages=int(sys.argv[3])))
open(sys.argv[4], "wb").write(k.asm["cubin"])
"""


def triton_ir(fn, *args) -> list[tuple[str, int, int]]:
    """(Triton IR text, num_warps, num_stages) of every Pallas kernel in fn(*args), lowered for CUDA."""
    from jax._src.lib import triton as jaxlib_triton
    from jax._src.lib.mlir import ir

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    if o.operation.name == "stablehlo.custom_call" and "triton" in str(o.attributes["call_target_name"]):
                        config = o.attributes["mhlo.backend_config"]
                        found.append((ir.StringAttr(config["ir"]).value_bytes,
                                      ir.IntegerAttr(config["num_warps"]).value, ir.IntegerAttr(config["num_stages"]).value))
                    walk(o.operation)

    walk(module.operation)
    texts = []
    for blob, warps, stages in found:
        ctx = ir.Context()
        jaxlib_triton.dialect.register_dialect(ctx)
        with ctx:
            texts.append((str(ir.Module.parse(blob)), warps, stages))
    return texts


def loop_counts(sass: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each backward branch's body in a cuobjdump listing."""
    ops = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", line)
        if m:
            ops.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, op in ops:
        b = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", op)
        if b and int(b.group(1), 16) < addr:
            body = [o for a, o in ops if int(b.group(1), 16) <= a <= addr]
            names = (re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in body)
            loops.append((len(body), collections.Counter(names)))
    return loops


KEYS_ZERO = {"auto": None, "on": True, "off": False}  # --keys-zero -> Cw2Config.keys_zero


def decode_ir(args):
    """[(Triton IR, warps, stages, description, cache elements a thread per loop step, unit)] of
    the KV decode kernels over a KIVI cache: batch 1, 32 kv heads, head_dim 128, 32k tokens
    (Llama-2-7B). cw2 has two kernels (keys, then values)."""
    from jaxcompress.kv import KIVICodec
    from pallas_kernels.decode_attention import (KEY_ROWS_F16, SMALL_GRID_VALUE_CHANNELS, Cw2Config, kernel_path,
                                                 key_prefetch_of, quantized_decode_partials)

    codec = KIVICodec(args.bits, args.bits, group_size=args.group_size, layout=args.layout, columns=args.columns)
    state = jax.eval_shape(lambda: codec.init(1, 32768, 32, 128, jnp.bfloat16))
    k, v = (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state[n]) for n in ("k", "v"))
    q, mask = jnp.ones((1, 32, 1, 128), jnp.float32), jnp.ones((1, k.capacity), bool)
    value_rows = getattr(args, "value_channels", SMALL_GRID_VALUE_CHANNELS)  # batch 1's default (a small grid)
    cw2 = Cw2Config(value_channels=value_rows, keys_zero=KEYS_ZERO[getattr(args, "keys_zero", "auto")],
                    columns=getattr(args, "cw2_columns", 128), key_warps=getattr(args, "cw2_warps", None),
                    value_warps=getattr(args, "cw2_warps", None), key_prefetch=getattr(args, "key_prefetch", None))
    kernels = triton_ir(lambda q, k, v, m: quantized_decode_partials(q, k, v, m, 32768, scale=0.1, num_warps=args.warps,
                                                                     path=args.path, num_stages=args.stages,
                                                                     eviction=getattr(args, "eviction", "evict_first"),
                                                                     cw2=cw2),
                         q, k, v, mask)
    body = kernel_path(args.path, k, v, False)
    desc = f"{codec.name} {codec.store_layout} columns/rows {k.rows} warps {args.warps} body {body}"
    c = 32 // args.bits
    out = []
    for i, (ttir, warps, stages) in enumerate(kernels):
        if body == "cw2" and i == 0:  # keys: a loop trip is `prefetch` steps of KEY_ROWS_F16 channel rows of one word column a thread
            prefetch = key_prefetch_of(cw2, 128)
            out.append((ttir, warps, stages, desc + f" (keys pass, {prefetch} steps a trip)", prefetch * KEY_ROWS_F16 * c,
                        "a key element"))
        elif body == "cw2":  # values: a block, value_rows channel rows of one word column a thread
            out.append((ttir, warps, stages, desc + f" (values pass, {value_rows} rows)", value_rows * c,
                        "a value element"))
        else:  # cw: one slot of a [128, columns] tile, keys and values; cw16: a pair of slots; mma: one slot of rows tokens
            out.append((ttir, warps, stages, desc, 2 * 128 * k.rows / (warps * 32) * (2 if body == "cw16" else 1),
                        "an element"))
    return out


def tools_dir(triton_python: str) -> str:
    """The folder of ptxas and cuobjdump in the triton wheel of `triton_python`."""
    return os.path.join(os.path.dirname(subprocess.run(
        [triton_python, "-c", "import triton, os; print(triton.__file__)"],
        capture_output=True, text=True, check=True).stdout.strip()), "backends", "nvidia", "bin")


def ptx_for(ptx: str, version: str) -> str:
    """The PTX with its `.version` lowered to `version` (what an older ptxas accepts; the
    instructions of the newer ISA that kernels of this repository use exist there too)."""
    return re.sub(r"^\.version\s+[0-9.]+", f".version {version}", ptx, count=1, flags=re.M)


def assemble_ptx(path: str, triton_python: str) -> tuple[str, str]:
    """(SASS listing, resource usage) of a PTX file assembled for sm_90a by the triton wheel's ptxas."""
    tools = tools_dir(triton_python)
    with open(path) as f:
        ptx = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        for _ in range(2):
            with open(src, "w") as f:
                f.write(ptx)
            done = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-O3", src, "-o", cubin],
                                  capture_output=True, text=True)
            newer = re.search(r"Unsupported \.version [0-9.]+; current version is '([0-9.]+)'", done.stderr)
            if not (done.returncode and newer):
                break
            ptx = ptx_for(ptx, newer.group(1))
        if done.returncode:
            raise UserError(f"ptxas could not assemble {path}:\n{done.stderr[-2000:]}")
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
    return sass, usage


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="0: one group per output channel")
    p.add_argument("--grid", default="sym", choices=("sym", "asym", "lut", "lut_scaled"))
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=1, help="batch (rows of x)")
    p.add_argument("--dequant", default="fma", choices=DEQUANT_MODES)
    p.add_argument("--dot", action="store_true", help="the tensor-core path (block_m 16 or more)")
    p.add_argument("--tile-dot", action="store_true", help="tensor-core path, one dot per tile")
    p.add_argument("--acc2d", action="store_true")
    p.add_argument("--prefetch", action="store_true", help="GEMV: the next step's loads a step ahead")
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--split-k", type=int, default=4)
    p.add_argument("--tiles-per-step", type=int, default=2)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--kernel", default="matmul", choices=("matmul", "decode"),
                   help="decode: the KV decode-attention kernel over a KIVI cache (Llama-2-7B heads, 32k "
                        "tokens; --bits, --group-size (key tokens / value channels), --warps, --stages, "
                        "--columns, --layout)")
    p.add_argument("--path", default="auto", help="decode: the kernel body (auto, mma, cw, cw16, cw2); "
                   "a cw16 loop step is a pair of slots")
    p.add_argument("--columns", type=int, default=32, help="decode, channel_words: word columns a tile")
    p.add_argument("--value-channels", type=int, default=16,
                   help="decode, cw2: channel rows a values program (16: batch 1's default)")
    p.add_argument("--keys-zero", choices=tuple(KEYS_ZERO), default="auto",
                   help="decode, cw2: q . zero summed in the keys pass (auto: as the kernel picks for batch 1, on)")
    p.add_argument("--cw2-columns", type=int, default=128, help="decode, cw2: word columns of a tile")
    p.add_argument("--cw2-warps", type=int, default=None, help="decode, cw2: warps a program of both passes (default columns / 32)")
    p.add_argument("--key-prefetch", type=int, default=None,
                   help="decode, cw2: steps of loads the keys pass keeps in flight (default: the kernel's)")
    p.add_argument("--layout", default="channel_words", choices=("channel_words", "token_rows"),
                   help="decode: the KIVI store layout (channel_words: the cw body; token_rows: mma)")
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python with the `triton` package (default: this one)")
    p.add_argument("--sass", help="also write the SASS listing here")
    p.add_argument("--ptx", help="tally this PTX file instead (a Mosaic GPU kernel's, dumped on the device)")
    args = p.parse_args(argv)

    if args.ptx:
        sass, usage = assemble_ptx(args.ptx, args.triton_python)
        if args.sass:
            with open(args.sass, "w") as f:
                f.write(sass)
        regs = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
        print(f"{args.ptx}\nregisters {regs.group(1)}, local (spill) bytes {regs.group(2)}" if regs else usage)
        for n, counts in loop_counts(sass):
            print(f"loop: {n} instructions; " + ", ".join(f"{k} {v}" for k, v in counts.most_common(12)))
        return 0

    if args.kernel == "decode":
        kernels = decode_ir(args)
    else:
        w = random_qarray(0, args.k, args.n, Variant(args.bits, args.group_size, args.grid))
        x = jnp.ones((args.m, args.k), jnp.bfloat16)
        dot = args.dot or args.tile_dot
        cfg = TileConfig(block_n=args.block_n, block_m=max(16, args.m) if dot else min(args.m, 8), use_dot=dot,
                         tile_dot=args.tile_dot, split_k=args.split_k, tiles_per_step=args.tiles_per_step,
                         dequant=args.dequant, acc2d=args.acc2d, prefetch=args.prefetch, num_warps=args.warps, num_stages=args.stages)
        (kernel,) = triton_ir(lambda x, w: quant_matmul(x, w, config=cfg), x, w)
        tile = kernel_layout(w).tile
        kernels = [(*kernel, str(cfg), args.tiles_per_step * tile * args.block_n / (args.warps * 32), "a weight")]
    for i, (ttir, warps, stages, desc, per_thread, unit) in enumerate(kernels):
        sass, usage = compile_sass(ttir, warps, stages, args.triton_python)
        if args.sass:
            with open(args.sass if len(kernels) == 1 else f"{args.sass}.{i}", "w") as f:
                f.write(sass)
        regs = re.search(r"REG:(\d+).*?LOCAL:(\d+)", usage)
        print(f"{desc}\nregisters {regs.group(1)}, local (spill) bytes {regs.group(2)}" if regs else usage)
        for n, counts in loop_counts(sass):
            print(f"loop: {n} instructions, {n / per_thread:.2f} {unit} (if it is the main loop); "
                  + ", ".join(f"{k} {v}" for k, v in counts.most_common(12)))


def compile_sass(ttir: str, warps: int, stages: int, triton_python: str) -> tuple[str, str]:
    """(SASS listing, resource usage) of a Triton IR kernel compiled for sm_90 by `triton_python`."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ttir"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ttir)
        env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")  # FMA contraction, as jaxlib's Triton does
        done = subprocess.run([triton_python, "-c", COMPILE, src, str(warps), str(stages), cubin],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise UserError(f"compiling the kernel with {triton_python}'s triton failed (is `triton` "
                            f"installed there? pip install triton==3.5.0):\n{done.stderr[-2000:]}")
        cuobjdump = os.path.join(tools_dir(triton_python), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    return sass, usage


if __name__ == "__main__":
    main()
