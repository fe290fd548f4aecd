"""Shared by the tests of the Hopper kernels (``test_sm90_forward.py``,
``test_sm90_backward.py``): whether they can run here, the layouts, block lists and random
problems the tests draw."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from blocksparse_attn import KVBlocks
from blocksparse_attn.kernels.availability import gluon_hopper_reasons

from helpers import EXPLORE, ON_GPU, examples


def hopper() -> bool:
    return ON_GPU and torch.cuda.get_device_capability() == (9, 0) and not gluon_hopper_reasons()


needs_hopper = pytest.mark.skipif(not hopper(), reason="needs an sm90 GPU with Gluon")


def compiled_in_a_new_process(module: str, function: str) -> list[dict]:
    """What ``module.function()`` (a compile check of the Hopper kernels) returns, run in a
    new Python process with Triton's interpreter off. In a process that has run interpreted
    kernels, Triton 3.6 leaves ``triton.language.core``'s builtins bound to the
    interpreter's builder (a ``@triton.jit`` helper called from an interpreted kernel
    patches them and nothing restores them), and a compile there can fail; the new process
    compiles as a user's program would."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, {module} as m; print(json.dumps(m.{function}()))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise AssertionError(f"{module}.{function}() failed (exit {run.returncode}):\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def layout_of(pattern: str, heads: int, nb: int) -> torch.Tensor:
    """A ``[heads, nb, nb]`` layout: dense, block-causal, or random (40%) with a query
    block that attends nothing and a key block that no query attends."""
    if pattern == "dense":
        return torch.ones(heads, nb, nb, dtype=torch.long)
    if pattern == "block_causal":
        return torch.tril(torch.ones(nb, nb, dtype=torch.long)).expand(heads, nb, nb).clone()
    g = torch.Generator().manual_seed(1)
    lay = (torch.rand(heads, nb, nb, generator=g) < 0.4).long()
    lay[0, 1] = 0  # a query block with nothing to attend
    lay[:, :, 2] = 0  # a key block no query attends
    return lay


def shuffled_lists(dense: torch.Tensor, generator) -> KVBlocks:
    """Block lists on the GPU of a bool ``[B, H_l, nb, nb]`` grid, each list's entries in a
    random order (the unused slots after them), so kernels cannot rely on sorted lists."""
    blocks = KVBlocks.from_layout(dense.long())
    order = torch.argsort(torch.rand(blocks.indices.shape, generator=generator), dim=-1)
    used = torch.arange(blocks.indices.shape[-1]) < blocks.num_blocks[..., None]
    keys = torch.where(used, order, blocks.indices.shape[-1] + order)  # used entries first
    shuffled = torch.gather(blocks.indices, -1, torch.argsort(keys, dim=-1))
    return KVBlocks(blocks.num_blocks.cuda(), shuffled.cuda())


def inputs(B, H, Hkv, L, D, dtype, magnitude=1.0, generator=None):
    """``q [B, H, L, D]``, ``k, v [B, Hkv, L, D]`` on the GPU, normal values times
    ``magnitude`` (drawn on the CPU from ``generator``)."""
    return (
        (torch.randn(B, h, L, D, generator=generator) * magnitude).to("cuda", dtype)
        for h in (H, Hkv, Hkv)
    )


def counting(monkeypatch, module, *names) -> list:
    """The names of ``module``'s functions ``names`` in the order they are called from now
    on (they still run)."""
    calls = []
    for name in names:
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kw):
            calls.append(_name)
            return _fn(*args, **kw)

        monkeypatch.setattr(module, name, counted)
    return calls


def short_parts(monkeypatch) -> None:
    """From now on the index cuts every list longer than half the mean non-empty list into
    parts of that length (at any size, where by default only lists of 64 tiles and more
    are cut)."""
    from blocksparse_attn import index

    monkeypatch.setattr(index, "PART_MIN", 1)
    monkeypatch.setattr(index, "PART_OVER_MEAN", 0.5)


def draw_problem(draw):
    """A random problem inside the Hopper kernels' domain: ``(q, k, v, layout, kw)`` on the
    GPU, head dim 128, block 128 (batch, heads and their grouping, layout heads, 1-8
    blocks, density, causal, a scale of any sign, input magnitude, fp16 or bf16)."""
    B, H = draw(st.integers(1, 2)), draw(st.sampled_from((1, 2, 3, 4)))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 3, 4) if H % d == 0]))
    heads = draw(st.sampled_from(sorted({1, Hkv, H})))
    nb = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from((torch.float16, torch.bfloat16)))
    magnitude = draw(st.sampled_from((1.0, 1.0, 4.0)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layout = torch.rand(heads, nb, nb, generator=g) < draw(st.sampled_from((0.2, 0.5, 1.0)))
    q, k, v = inputs(B, H, Hkv, nb * 128, 128, dtype, magnitude, g)
    kw = dict(
        block=128,
        causal=draw(st.booleans()),
        scale=draw(st.sampled_from((None, 0.3, -0.5, 0.0))),
    )
    return q, k, v, layout.long().cuda(), kw


def problem_settings(default: int):
    """Hypothesis settings of the random-problem tests: ``default`` examples (or the
    exploration count), fixed unless exploring, no shrinking (each example compiles
    anew)."""
    return settings(
        max_examples=examples(default),
        deadline=None,
        derandomize=not EXPLORE,
        database=None,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
