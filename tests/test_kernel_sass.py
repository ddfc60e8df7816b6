"""`scripts/kernel_sass.py`: the kernel's Triton IR is reachable on a CPU, and loop bodies are counted;
`scripts/profile_kv_decode.py` runs."""


import jax.numpy as jnp

from pallas_kernels.quant_matmul import TileConfig, quant_matmul
from pallas_kernels.testing import Variant, random_qarray
from script_loader import load_script

kernel_sass = load_script("scripts/kernel_sass.py")


def test_triton_ir_of_the_gemv_kernel_on_a_cpu():
    """Lowering for CUDA needs no GPU: the fma kernel's IR holds its exponent-word operand and FMAs."""
    w = random_qarray(0, 256, 64, Variant(4, 128, "asym"))
    cfg = TileConfig(block_n=32, dequant="fma", acc2d=True)
    ((ir, warps, stages),) = kernel_sass.triton_ir(lambda x, w: quant_matmul(x, w, config=cfg),
                                                   jnp.ones((1, 256), jnp.bfloat16), w)
    assert (warps, stages) == (cfg.num_warps, cfg.num_stages)
    assert "tt.func public @quant_matmul_w4_gemv" in ir
    assert ir.count("tt.ptr") >= 5  # x, codes, scale, zero, exponent word (+ output)
    assert "scf.for" in ir and "arith.ori" in ir and "tt.bitcast" in ir


def test_every_h2_candidate_lowers_for_cuda():
    """Triton's lowering rules (every array a power of two long, ...) hold for each "h2" GEMV
    candidate the autotuner proposes at batch 1 for the 7B shapes: the maximum of x over a K
    split of 7 tiles (14336 x 4096) once broke them, and only the GPU run showed it."""
    from pallas_kernels import autotune
    from pallas_kernels.benchmark import LLAMA_SHAPES
    from pallas_kernels.testing import abstract_weight

    lowered = 0
    for k, n in LLAMA_SHAPES:
        w = abstract_weight(k, n, Variant(4, 128))
        for cfg in autotune.candidates(autotune.kernel_layout(w), 1):
            if cfg.dequant == "h2":
                ((ir, _, _),) = kernel_sass.triton_ir(lambda x, w: quant_matmul(x, w, config=cfg),
                                                     jnp.ones((1, k), jnp.bfloat16), w)
                assert "tt.elementwise_inline_asm" in ir and "fma.rn.f16x2" in ir
                lowered += 1
    assert lowered >= 6 * len(LLAMA_SHAPES)


def test_loop_counts_of_a_listing():
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LOP3.LUT R2, R0, 0xf, R5, 0xf8, !PT ;
        /*0020*/                   FFMA R3, R2, R4, -2056 ;
        /*0030*/                   FFMA R6, R3, R7, R6 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
    """
    ((n, counts),) = kernel_sass.loop_counts(listing)
    assert n == 4 and counts == {"LOP3": 1, "FFMA": 2, "BRA": 1}


def test_ptx_version_is_lowered_for_an_older_ptxas():
    ptx = "//\n// Generated\n//\n\n.version 9.0\n.target sm_90a\n.address_size 64\n"
    out = kernel_sass.ptx_for(ptx, "8.7")
    assert ".version 8.7\n.target sm_90a" in out and "9.0" not in out
    assert kernel_sass.ptx_for(out, "8.7") == out


def test_decode_ir_lowers_the_cuda_core_bodies():
    """--kernel decode: the KIVI-2 cache in the channel_words layout lowers to the cw body (with
    --path cw), whose slot loop sits inside the block loop (two nested scf.for; the bit offsets
    are loop values), with --path cw16 to the one-pass f16x2 body (inline PTX, a loop step per
    pair), and by default to cw2's two kernels: keys (a loop trip of 2 steps of 8 channel rows of a
    word column a lane, `key_prefetch`) and values (a block: 16 channel rows of a word column a lane, batch 1's default)."""
    import argparse

    args = argparse.Namespace(bits=2, group_size=32, layout="channel_words", columns=32, warps=4, stages=2,
                              path="cw")
    ((ir, warps, stages, desc, per_thread, unit),) = kernel_sass.decode_ir(args)
    assert (warps, stages) == (4, 2)
    assert "@kv_decode_k2v2_cw(" in ir and "channel_words" in desc and desc.endswith("body cw")
    assert ir.count("scf.for") >= 3 and "tt.bitcast" in ir and "__nv_exp2f" in ir
    assert per_thread == 2 * 128 * 32 / 128 and unit == "an element"
    ((ir, _, _, desc, per_thread, _),) = kernel_sass.decode_ir(argparse.Namespace(**{**vars(args), "path": "cw16"}))
    assert "@kv_decode_k2v2_cw16(" in ir and desc.endswith("body cw16")
    assert "fma.rn.f16x2" in ir and "lop3.b32" in ir and "cvt.rn.f16x2.f32" in ir
    assert per_thread == 2 * 2 * 128 * 32 / 128
    keys, values = kernel_sass.decode_ir(argparse.Namespace(**{**vars(args), "path": "auto"}))  # auto: cw2
    assert "@kv_decode_k2_scores(" in keys[0] and keys[1] == 4 and keys[3].endswith("(keys pass, 2 steps a trip)")
    assert keys[4] == 2 * 8 * 16 and "fma.rn.f16x2" in keys[0] and "tt.store" in keys[0]
    assert "@kv_decode_v2_values(" in values[0] and values[4] == 16 * 16  # a block: 16 channel rows of a word
    # Each pass loads its code words with `evict_first` (read once a step, pallas_kernels/hints.py);
    # the scores, scales and q are not hinted; eviction=None drops the hint.
    for ir in (keys[0], values[0]):
        loads = [ld for ld in ir.splitlines() if "tt.load" in ld]
        assert 0 < sum("evict_first" in ld for ld in loads) < len(loads)
    keys, values = kernel_sass.decode_ir(argparse.Namespace(**{**vars(args), "path": "auto", "eviction": None}))
    assert "evict_first" not in keys[0] + values[0]


def test_profile_script_runs_the_kernel(capsys):
    """scripts/profile_kv_decode.py (the program ncu watches) builds a KIVI-2 cache and runs the
    default decode body on it: here in interpret mode, at a short context."""
    module = load_script("scripts/profile_kv_decode.py")
    module.main(["--batch", "1", "--context", "1024"])
    assert "kivi_k2v2 path auto batch 1 context 1024: output (1, 1, 32, 128), finite True" in capsys.readouterr().out


def test_code_loads_carry_the_evict_first_hint():
    """The codes of a GEMV (one block of rows reads them) are loaded with `evict_first` (read
    once: kernel_notes run 10 measured 3-12% from it); x and the scales are not; the tensor-core
    path, whose row blocks share the codes, and `hints=NO_HINTS` give plain loads."""
    import re

    from pallas_kernels.quant_matmul import NO_HINTS

    w = random_qarray(0, 4096, 256, Variant(4, 128, "asym"))
    gemv = TileConfig(block_n=64, split_k=4, tiles_per_step=2, dequant="h2", acc2d=True, prefetch=True)
    dot = TileConfig(block_n=64, block_m=16, use_dot=True, dequant="fma")

    def hinted_loads(cfg, m, **kw):
        ((ir, _, _),) = kernel_sass.triton_ir(lambda x, w: quant_matmul(x, w, config=cfg, **kw),
                                             jnp.ones((m, 4096), jnp.bfloat16), w)
        loads = re.findall(r"tt\.load [^\n]*", ir)
        return sum("evict_first" in ld for ld in loads), len(loads)

    hinted, loads = hinted_loads(gemv, 1)
    assert 0 < hinted < loads  # the codes (per tile of a step, and prefetched) but not x or the groups
    assert hinted_loads(gemv, 1, hints=NO_HINTS)[0] == 0
    assert hinted_loads(dot, 32)[0] == 0
