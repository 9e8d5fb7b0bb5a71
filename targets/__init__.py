"""Compilation targets of lpbq_tvm, installed as ``lpbq_tvm.targets``."""
