"""What the Hopper (sm90) Gluon kernels of :mod:`.sm90_fwd` and :mod:`.sm90_bwd` share: TMA
descriptors of ``[rows, D]`` tiles, the program schedule over the index's work items, a
pair of TMA loads on one barrier, the TMA bulk reduction, and the compile check that reads
``ptxas -v`` without a GPU. This module imports Gluon: load it only where the Hopper
kernels run (or to compile them)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile

import torch
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@functools.cache
def shared_layout(rows: int, D: int, dtype: torch.dtype):
    """The shared-memory layout of a ``[rows, D]`` tile (made once: making it costs more
    host time than the rest of a descriptor)."""
    dt = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, D], dt)


def descriptor(t, rows):
    """A TMA descriptor of contiguous ``t`` seen as ``[numel / D, D]`` in ``[rows, D]``
    tiles."""
    D = t.shape[-1]
    n = t.numel() // D
    lay = shared_layout(rows, D, t.dtype)
    return TensorDescriptor(t, [n, D], [D, 1], [rows, D], lay)


@gluon.jit
def work_item(items, order, heads_per_layout_head, batch, tiles, H, GROUP: gl.constexpr):
    """This program's ``(tile, batch, head, start, end, slot)``: the schedule of
    :func:`~._common._schedule` (work items longest first, in groups of ``GROUP``; the
    ``k``-th program of an item serves its ``k``-th batch-head; ``slot`` is where a part of
    a cut list writes, ``-1`` for a whole list)."""
    rep = batch * heads_per_layout_head
    pid = gl.program_id(0)
    n_items = gl.num_programs(0) // rep
    first = pid // (GROUP * rep) * GROUP
    size = gl.minimum(n_items - first, GROUP)
    r = pid - first * rep
    k = r // size
    item = items + 4 * gl.load(order + first + r % size).to(gl.int64)
    list_id = gl.load(item)
    start = gl.load(item + 1)
    end = gl.load(item + 2)
    part = gl.load(item + 3)
    tile = list_id % tiles
    h = list_id // tiles * heads_per_layout_head + k % heads_per_layout_head
    b = k // heads_per_layout_head + h // H
    slot = gl.where(part < 0, -1, part.to(gl.int64) * rep + k)
    return tile, b, h % H, start, end, slot


@gluon.jit
def load_pair(a_desc, b_desc, a_smem, b_smem, bar, stage, row):
    """Rows ``row`` of two tensors (Q and dO, or K and V) through TMA into ``stage`` of
    their shared-memory rings, both counted on that stage's barrier."""
    mbarrier.expect(bar.index(stage), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row, 0], bar.index(stage), a_smem.index(stage))
    tma.async_copy_global_to_shared(b_desc, [row, 0], bar.index(stage), b_smem.index(stage))


@builtin
def tma_add(tensor_desc, coord, src, _semantic=None):
    """``global[box at coord] += src``, a shared-memory tile, by one TMA bulk reduction
    (``cp.reduce.async.bulk.tensor``); it reads ``src`` asynchronously, like a TMA store
    (``tma.store_wait`` waits for that)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle
    )


def compile_sm90(fn, signature: dict, constexprs: dict) -> dict:
    """Compile the Gluon kernel ``fn`` for sm90 without a GPU (``signature``: argument
    types, ``constexprs``: their values, ``num_warps`` among them): its shared memory in
    bytes, and what ``ptxas -v`` reports of the machine code: registers a thread, the
    bytes it spills to local memory, and how often it warns that it serialized the
    ``wgmma`` pipeline (an accumulator read while its product may still run)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(fn, signature=signature, constexprs=constexprs)
    options = dict(num_warps=constexprs["num_warps"])
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run(
            [knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    serialized = report.count("wgmma.mma_async instructions are serialized")
    spills = re.findall(r"(\d+) bytes spill stores", report)
    registers = re.findall(r"Used (\d+) registers", report)
    if not (spills and registers):
        raise RuntimeError(f"ptxas -v printed no register or spill counts:\n{report}")
    return dict(
        shared=kernel.metadata.shared,
        spills=sum(map(int, spills)),
        registers=max(map(int, registers)),
        serialized=serialized,
    )
