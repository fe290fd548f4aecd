"""Experiment (GPU host): where the host time of a small forward+backward goes. Times 200
calls of the public function without synchronising (random 1%, L8192 B1 H2 D64, block 64)
and profiles them with cProfile. Writes $OUT/host_time.txt.

    PYTHONPATH=src python3 benchmarks/experiments/host_time.py
"""

import cProfile
import io
import os
import pstats
import time

import torch

from blocksparse_attn import block_sparse_attention
from blocksparse_attn.tools.bench_cases import Case


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    case = Case("random", 8192, 1, 2, 64, 64, density=0.01)
    lay = case.layout().cuda()
    q, k, v = (
        torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    do = torch.randn_like(q)

    def fwd():
        return block_sparse_attention(q, k, v, lay, block=64)

    def step():
        torch.autograd.grad(fwd(), (q, k, v), do)

    report = io.StringIO()
    for name, fn in (("forward", fwd), ("forward+backward", step)):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t) / 200 * 1e3
        torch.cuda.synchronize()
        total = (time.perf_counter() - t) / 200 * 1e3
        print(f"{name}: host {host:.3f} ms per call, with the GPU {total:.3f} ms", file=report)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(25)
    text = report.getvalue()
    print(text)
    with open(os.path.join(out_dir, "host_time.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
