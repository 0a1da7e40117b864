"""`rsparse bench`: decode speed of dense vs sparsified models with the lean static-cache decoder.

Dense and sparse models are timed alternately in one process (same dtype, threads and cache), per
decoded token, median over all steps of all repeats. The sparse model runs whatever modules
`sparsify_` installed; today that is the eager `RSparseLinear` oracle on the CPU (a dense matmul on
masked inputs plus the low-rank term), which reads every weight and is therefore slower than dense:
this harness measures it honestly and is where a real CPU backend (issue 6) will be measured.
Prints a table, ends with one JSON line, writes benchmarks/results-style JSON to --out.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from .apply import sparsify_
from .decode import StaticDecoder
from .errors import RSparseError
from .models import load
from .pipeline import observe
from .plan import RSparseConfig, build_plan


def _step_times(model, prompt, new_tokens):
    dec = StaticDecoder(model, max_len=prompt.shape[1] + new_tokens + 1)
    logits = dec.prefill(prompt)
    times = []
    for _ in range(new_tokens):
        tok = logits.argmax(-1, keepdim=True)
        t = time.perf_counter()
        logits = dec.forward(tok)
        times.append(time.perf_counter() - t)
    return times


def _weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_bench(args):
    if args.device != "cpu":
        raise RSparseError("only --device cpu is measured by this harness so far; GPU kernels are benchmarked "
                           "by benchmarks/gpu_kernels.py")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense, tok = load(args.model, args.dtype)
    prompt = torch.tensor([tok("The history of the printing press", add_special_tokens=False)["input_ids"]])
    stats = observe(dense, tok, tokens=args.calib_tokens, scores=("abs",))
    rows = []
    for s in sparsities:
        sparse, _ = load(args.model, args.dtype)
        sparsify_(sparse, build_plan(sparse, stats, RSparseConfig(sparsity=s)))
        d_times, s_times = [], []
        for _ in range(args.repeats):  # alternate so drift hits both equally
            d_times += _step_times(dense, prompt, args.tokens)
            s_times += _step_times(sparse, prompt, args.tokens)
        row = {"sparsity": s, "dense_tok_s": 1 / statistics.median(d_times), "sparse_tok_s": 1 / statistics.median(s_times),
               "dense_weight_bytes": _weight_bytes(dense), "sparse_weight_bytes": _weight_bytes(sparse)}
        row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
        rows.append(row)
        print(f"sparsity {s:.2f}: dense {row['dense_tok_s']:.1f} tok/s, sparse {row['sparse_tok_s']:.1f} tok/s, "
              f"speedup {row['speedup']:.2f}x", flush=True)
    result = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "backend": "eager-oracle",
              "tokens": args.tokens, "repeats": args.repeats, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
    mid = min(rows, key=lambda r: abs(r["sparsity"] - 0.5))
    print(json.dumps({"dense_tok_s": mid["dense_tok_s"], "sparse_tok_s": mid["sparse_tok_s"], "speedup": mid["speedup"],
                      "sparsity": mid["sparsity"], "backend": "eager-oracle", "rows": rows}))
