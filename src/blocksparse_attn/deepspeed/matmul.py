"""``deepspeed.ops.sparse_attention.matmul``: the block-sparse products (sdd, dsd, dds)."""

from ..ops.matmul import MatMul

__all__ = ["MatMul"]
