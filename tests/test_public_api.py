"""The public surface: every exported name resolves, and importing does not import Triton."""

import subprocess
import sys

import blocksparse_attn


def test_all_names_resolve():
    for name in blocksparse_attn.__all__:
        assert getattr(blocksparse_attn, name) is not None


def test_unknown_name_raises():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blocksparse_attn.nope  # noqa: B018


def test_import_is_light():
    code = (
        "import sys, blocksparse_attn; blocksparse_attn.FixedSparsityConfig; "
        "blocksparse_attn.reference_attention; print('triton' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
