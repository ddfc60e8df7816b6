"""KV-cache compression: codecs for `KVCache` (KIVI, KVQuant, integer baselines), their
calibration, memory accounting and recipes. The decode kernel lives in
pallas_kernels/decode_attention.py."""

from jaxcompress.kv.base import ATTENTION_MODES, PackedCodec
from jaxcompress.kv.calibration import KVCalibration, calibration_tokens, collect_kv
from jaxcompress.kv.kivi import KIVICodec
from jaxcompress.kv.kvquant import KVQuantCodec, fit_kvquant
from jaxcompress.kv.store import KV_BITS, QTokens
from jaxcompress.kv.uniform import UniformCodec, fit_uniform_tensor

__all__ = ["ATTENTION_MODES", "KIVICodec", "KVCalibration", "KVQuantCodec", "KV_BITS", "PackedCodec",
           "QTokens", "UniformCodec", "calibration_tokens", "collect_kv", "fit_kvquant",
           "fit_uniform_tensor"]
