"""DeepSpeed's ``deepspeed.ops.sparse_attention`` package, module for module, on this library.

Migration is a rename of the package prefix::

    # from deepspeed.ops.sparse_attention import SparseSelfAttention, FixedSparsityConfig
    # from deepspeed.ops.sparse_attention.softmax import Softmax
    from blocksparse_attn.deepspeed import SparseSelfAttention, FixedSparsityConfig
    from blocksparse_attn.deepspeed.softmax import Softmax

or no change at all: :func:`install` (where DeepSpeed itself is not installed) makes
``import deepspeed.ops.sparse_attention...`` resolve to these modules.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

from ..modules import BertSparseSelfAttention, SparseAttentionUtils, SparseSelfAttention
from ..ops.matmul import MatMul
from ..ops.softmax import Softmax
from ..patterns import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)

SUBMODULES = (
    "sparsity_config",
    "softmax",
    "matmul",
    "sparse_self_attention",
    "bert_sparse_self_attention",
    "sparse_attention_utils",
)

__all__ = [
    "SparsityConfig",
    "DenseSparsityConfig",
    "FixedSparsityConfig",
    "VariableSparsityConfig",
    "BigBirdSparsityConfig",
    "BSLongformerSparsityConfig",
    "LocalSlidingWindowSparsityConfig",
    "MatMul",
    "Softmax",
    "SparseSelfAttention",
    "BertSparseSelfAttention",
    "SparseAttentionUtils",
    "install",
    "uninstall",
]

_MARK = "__blocksparse_attn_stand_in__"


def install() -> None:
    """Make ``deepspeed``, ``deepspeed.ops``, ``deepspeed.ops.sparse_attention`` and its
    submodules (``sparsity_config``, ``softmax``, ``matmul``, ``sparse_self_attention``,
    ``bert_sparse_self_attention``, ``sparse_attention_utils``) importable as this library's,
    so a training script written for DeepSpeed's sparse attention runs unchanged. Only the
    sparse-attention part of DeepSpeed exists then; nothing else of ``deepspeed`` does.

    Raises ``RuntimeError`` when DeepSpeed itself is installed or imported (shadowing it
    would break the rest of it): change the imports to ``blocksparse_attn.deepspeed`` there.
    Calling it again is a no-op."""
    present = sys.modules.get("deepspeed")
    if present is not None and getattr(present, _MARK, False):
        return
    if present is not None or importlib.util.find_spec("deepspeed") is not None:
        raise RuntimeError(
            "blocksparse_attn.deepspeed.install(): DeepSpeed is installed, and standing in for "
            "it would hide the rest of DeepSpeed. Fix: import from blocksparse_attn.deepspeed "
            "instead of deepspeed.ops.sparse_attention (the same module names), or uninstall "
            "DeepSpeed."
        )
    root = types.ModuleType(
        "deepspeed",
        "Stand-in for DeepSpeed's sparse attention only (blocksparse_attn.deepspeed.install()).",
    )
    ops = types.ModuleType("deepspeed.ops")
    root.__path__, ops.__path__ = [], []
    # a spec, so that importlib.util.find_spec("deepspeed") answers (transformers asks it
    # at import; a module without one makes it raise ValueError)
    root.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None, is_package=True)
    ops.__spec__ = importlib.machinery.ModuleSpec("deepspeed.ops", None, is_package=True)
    setattr(root, _MARK, True)
    package = sys.modules[__name__]
    root.ops, ops.sparse_attention = ops, package
    sys.modules.update(
        {"deepspeed": root, "deepspeed.ops": ops, "deepspeed.ops.sparse_attention": package}
    )
    for name in SUBMODULES:
        sys.modules[f"deepspeed.ops.sparse_attention.{name}"] = importlib.import_module(
            f"{__name__}.{name}"
        )


def uninstall() -> None:
    """Undo :func:`install` (nothing happens if it was not called)."""
    root = sys.modules.get("deepspeed")
    if root is None or not getattr(root, _MARK, False):
        return
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        del sys.modules[name]
