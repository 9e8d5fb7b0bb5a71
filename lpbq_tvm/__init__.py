"""lpbq_tvm: Low-Power Blockwise Quantization (LPBQ) of ONNX models, compiled with Apache TVM Relax.

The numpy encoder (:mod:`lpbq_tvm.encoder`) and the packed storage (:mod:`lpbq_tvm.packing`)
import without TVM; the compiler passes live in :mod:`lpbq_tvm.passes`, the targets in
:mod:`lpbq_tvm.targets`. ``lpbq_tvm.compile`` imports TVM on first use.
"""

from lpbq_tvm.encoder import LPBQConfig, LPBQEncoding, encode_lpbq, sqnr_db, weight_axes
from lpbq_tvm.packing import PackedLPBQ, bits_per_weight, pack, packed_nbytes, unpack
from lpbq_tvm.quantsim import LayerReport, QuantizationSimModel, set_grouped_blockwise_quantization_for_weights

__version__ = "0.1.0"

__all__ = [
    "LPBQConfig",
    "LPBQEncoding",
    "LayerReport",
    "PackedLPBQ",
    "QuantizationSimModel",
    "bits_per_weight",
    "compile",
    "encode_lpbq",
    "pack",
    "packed_nbytes",
    "set_grouped_blockwise_quantization_for_weights",
    "sqnr_db",
    "unpack",
    "weight_axes",
]


def __getattr__(name: str):
    if name == "compile":
        from lpbq_tvm.compiler import compile

        return compile
    raise AttributeError(f"module 'lpbq_tvm' has no attribute {name!r}")
