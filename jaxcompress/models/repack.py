"""Repacking a quantized model's 2-, 3-, 4- and 8-bit projections for the Hopper wgmma kernel (a deployment step).

`pallas_kernels.wgmma_matmul` multiplies by a `W4Weight`: the codes of a 2-, 3-, 4- or 8-bit `QArray`
transposed, permuted within chunks of columns and stored in 64 x block_k tiles, read with TMA into a
pipeline of shared-memory stages. `repack_for_wgmma(model)` converts every projection
whose weight it can lay out; `linear()` then runs the kernel at decode batches on an H100/H200
and dequantize-then-dot elsewhere. Like `fuse_projections`, it is the last step before serving:
fuse first (the fused q|k|v and gate|up weights repack as one each), then repack.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxcompress.models.build import path_str
from jaxcompress.quant.qarray import QArray


@dataclasses.dataclass
class RepackReport:
    repacked: list[str] = dataclasses.field(default_factory=list)  # "layers.0.mlp.down_proj.kernel"
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why

    def summary(self) -> str:
        text = f"repacked {len(self.repacked)} weights for the wgmma kernel"
        if self.skipped:
            first = next(iter(self.skipped.items()))
            text += f"; left {len(self.skipped)} as they were (e.g. {first[0]}: {first[1]})"
        return text


def repack_for_wgmma(model, *, pad_k: bool = True, bits: tuple[int, ...] = (2, 3, 4, 8)):
    """(repacked model, RepackReport); `model` is left as it was.

    `bits`: the code widths to repack (others are reported and kept). 8-bit weights gain past batch 1:
    on an H200 a random Llama-2-7B RTN W8 decode step took 4.09 ms repacked against 14.81 as QArrays at
    batch 8 (bf16 4.79), but 3.30 against 3.03 at batch 1, where the QArrays' tuned Triton GEMV wins
    (kernel_notes run 21); `bits=(2, 3, 4)` keeps them QArrays for batch-1 serving. 2-bit weights gain at
    both since the conversion's PTX lop3 (`W4Config.lop3`): W2 g128 2.16 against 2.25 ms at batch 1
    (kernel_notes run 23; before it 2.45 against 2.26) and 3.06 against 11.11 at batch 8 (run 21). 3-bit
    weights gain at both: RTN W3 g128 3.24 / 3.44 ms at batch 1 / 8 repacked, 4.20 ms at batch 1 as
    QArrays (bf16 4.24 / 4.67; kernel_notes run 22).
    QArray leaves of those widths that `wgmma_matmul.repack_problem` accepts become `W4Weight`s, blocked by
    `choose_block_k`; every other QArray is reported with the reason and kept. `pad_k` stores a
    K that 256-column steps cannot split well (Llama-2's 11008) padded with zeros (`padded_k`,
    2.3% more bytes for 11008), blocked by 256: on an H200 the down projection 11008 x 4096 took
    11.8 us a call padded against 17.4 unpadded, and a decode step 2.60 against 2.86 ms at batch 1
    (kernel_notes run 16)."""
    from pallas_kernels.wgmma_matmul import repack_problem, repack_w4, stored_layout

    graphdef, state = nnx.split(nnx.clone(model))
    report = RepackReport()
    for path, var in nnx.to_flat_state(state):
        leaf = var.get_value()
        if not isinstance(leaf, QArray):
            continue
        name = path_str(path)
        problem = repack_problem(leaf)
        if problem is None and leaf.bits not in bits:
            problem = f"bits={leaf.bits} not asked for (bits={bits})"
        if problem is not None:
            report.skipped[name] = problem
            continue
        block_k, stored_k = stored_layout(*leaf.shape, grouped=leaf.scale.shape[0] > 1, pad_k=pad_k)
        var.set_value(repack_w4(leaf, block_k=block_k, stored_k=stored_k))
        report.repacked.append(name)
    return nnx.merge(graphdef, state), report
