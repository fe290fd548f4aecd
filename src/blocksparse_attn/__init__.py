"""blocksparse-attn: block-sparse attention for PyTorch.

Triton kernels on NVIDIA GPUs, an exact PyTorch path everywhere else, and DeepSpeed's
sparse-attention API (same class names and arguments). Importing the package does not
import Triton; kernels load on first use.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# public name -> module that defines it (loaded on first access)
_EXPORTS = {
    "SparsityConfig": ".patterns",
    "DenseSparsityConfig": ".patterns",
    "FixedSparsityConfig": ".patterns",
    "VariableSparsityConfig": ".patterns",
    "BigBirdSparsityConfig": ".patterns",
    "BSLongformerSparsityConfig": ".patterns",
    "LocalSlidingWindowSparsityConfig": ".patterns",
    "LayoutSparsityConfig": ".patterns",
    "SparseIndex": ".index",
    "build_index": ".index",
    "get_index": ".index",
    "KVBlocks": ".kv_blocks",
    "topk_blocks": ".selection",
    "reference_attention": ".reference",
    "block_sparse_attention": ".functional",
    "block_sparse_attention_varlen": ".varlen",
    "block_sparse_decode": ".decode",
    "MatMul": ".ops.matmul",
    "Softmax": ".ops.softmax",
    "to_sparse": ".compressed",
    "to_dense": ".compressed",
    "SparseSelfAttention": ".modules",
    "BertSparseSelfAttention": ".modules",
    "SparseAttentionUtils": ".modules",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'blocksparse_attn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
