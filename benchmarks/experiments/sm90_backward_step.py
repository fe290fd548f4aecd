"""Experiment (Hopper GPU): what the Gluon backward (``kernels/sm90_bwd.py``) gives a whole
forward+backward step. Each case is timed three ways in one process, as ``bench`` times
it (``do_bench`` median, bf16, a CPU layout): ours with the Triton backward
(``BLOCKSPARSE_ATTN_SM90=0``), ours as the library chooses (the Gluon backward where
``sm90_backward_plan`` accepts the case), and FlexAttention on the same block mask.
The window_global row is a control: its long global lists keep the Triton backward.
Writes ``$OUT/sm90_backward_step.json``.

    PYTHONPATH=src python3 benchmarks/experiments/sm90_backward_step.py [name part ...]
"""

import json
import os
import sys

import torch

from blocksparse_attn.kernels.fused_bwd import sm90_backward_plan
from blocksparse_attn.tools.bench_cases import Case
from blocksparse_attn.tools.bench_harness import time_backend

CASES = [
    Case("dense", 8192, 4, 8, 128, 128),
    Case("causal_dense", 8192, 4, 8, 128, 128, causal=True),
    Case("random", 8192, 4, 8, 128, 128, density=0.11),
    Case("random", 8192, 4, 8, 128, 128, density=0.3),
    Case("window_global", 16384, 2, 8, 128, 128),
]


def main(match: list[str]) -> None:
    rows = []
    for case in [c for c in CASES if not match or any(m in c.name for m in match)]:
        layout = case.layout()
        q = torch.empty(case.batch, case.heads, case.seq_len, case.head_dim, device="cuda")
        q = q.to(torch.bfloat16)
        taken = (
            sm90_backward_plan(q, q, q, q, layout.cuda(), block=case.block, causal=case.causal)
            is not None
        )
        row = {"case": case.name, "hopper_backward": taken}
        for label, env in (("triton_bwd", "0"), ("library", "1")):
            os.environ["BLOCKSPARSE_ATTN_SM90"] = env
            r = time_backend("fused", case, layout, "fwd+bwd", torch.bfloat16)
            row[f"{label}_ms"], row[f"{label}_tf"] = r["ms"], r["tflops"]
            if r.get("error"):
                row[f"{label}_error"] = r["error"]
        r = time_backend("flex", case, layout, "fwd+bwd", torch.bfloat16)
        row["flex_ms"], row["flex_error"] = r["ms"], r.get("error")
        if row["triton_bwd_ms"] and row["library_ms"]:
            row["triton_bwd_over_library"] = row["triton_bwd_ms"] / row["library_ms"]
            if row["flex_ms"]:
                row["flex_over_library"] = row["flex_ms"] / row["library_ms"]
        rows.append(row)
        print(row, flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "sm90_backward_step.json"), "w") as f:
        json.dump(
            dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1
        )


if __name__ == "__main__":
    main(sys.argv[1:])  # optional: substrings of the case names to run
