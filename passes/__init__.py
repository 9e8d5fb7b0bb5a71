"""TVM Relax passes of the LPBQ pipeline, installed as ``lpbq_tvm.passes``."""
