"""Quantization: the QArray leaf type, quantizers, and the fused-kernel path of linear()."""

from jaxcompress.quant import kernels_dispatch as _kernels_dispatch  # noqa: F401  (registers linear() for QArray)
