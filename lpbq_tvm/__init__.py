"""lpbq_tvm: Low-Power Blockwise Quantization (LPBQ) of ONNX models, compiled with Apache TVM Relax.

The numpy encoder (:mod:`lpbq_tvm.encoder`) and the packed storage (:mod:`lpbq_tvm.packing`)
import without TVM; the compiler passes live in :mod:`lpbq_tvm.passes`, the targets in
:mod:`lpbq_tvm.targets`.
"""

from lpbq_tvm.encoder import LPBQConfig, LPBQEncoding, encode_lpbq, sqnr_db, weight_axes
from lpbq_tvm.packing import PackedLPBQ, bits_per_weight, pack, packed_nbytes, unpack

__version__ = "0.1.0"

__all__ = [
    "LPBQConfig",
    "LPBQEncoding",
    "PackedLPBQ",
    "bits_per_weight",
    "encode_lpbq",
    "pack",
    "packed_nbytes",
    "sqnr_db",
    "unpack",
    "weight_axes",
]
