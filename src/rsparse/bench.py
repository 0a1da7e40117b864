"""`rsparse bench --device cpu`: decode speed of dense vs sparsified models, batch 1, static KV cache.

Dense is the plain PyTorch decode of the same model (nn.Linear -> MKL GEMV, same dtype, same
threads, same `StaticDecoder`); sparse is the same decoder with every planned projection on the C++
backend (`kernels.cpu`, backend "cpp") or on the eager oracle (backend "oracle", which reads every
weight: a correctness reference, not a speed path). Dense and sparse are timed alternately, repeat
after repeat, per decoded token; medians over all steps of all repeats. Before timing, the sparse
backend's greedy tokens are compared with the eager oracle's on the same plan. Peak memory: the
resident set of a fresh subprocess that loads the model (and applies the plan) and decodes.
Prints a table, ends with one JSON line; --out writes the results JSON.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .apply import sparsify_
from .decode import StaticDecoder
from .errors import RSparseError
from .models import load
from .pipeline import observe
from .plan import RSparseConfig, build_plan

PROMPT = "The history of the printing press"


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


def sparse_model(name, dtype, plan, backend):
    """A fresh copy of the model in `dtype` with `plan` applied, on `backend` ("cpp" or "oracle")."""
    model, _ = load(name, dtype)
    sparsify_(model, plan)
    if backend == "cpp":
        from .kernels.cpu import to_cpu_backend_

        to_cpu_backend_(model)
    return model


def peak_rss_mb(args_list) -> float:
    """Peak resident memory (MB) of a fresh process running `python -m rsparse.bench _rss ...`."""
    out = subprocess.run([sys.executable, "-m", "rsparse.bench", "_rss", *args_list], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_bench(args):
    if args.device != "cpu":
        raise RSparseError("rsparse bench measures --device cpu; GPU decode is benchmarks/gpu_decode.py (needs a CUDA machine)")
    if args.backend not in ("cpp", "oracle"):
        raise RSparseError(f"unknown backend {args.backend!r}; use cpp or oracle")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense, tok = load(args.model, args.dtype)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    calib, _ = load(args.model, "float32")
    stats = observe(calib, tok, tokens=args.calib_tokens, scores=("abs",))
    rows = []
    for s in sparsities:
        plan = build_plan(calib, stats, RSparseConfig(sparsity=s))
        sparse = sparse_model(args.model, args.dtype, plan, args.backend)
        oracle = sparse_model(args.model, args.dtype, plan, "oracle")
        n_check = 64
        same = torch.equal(StaticDecoder(sparse, 128).greedy(prompt, n_check), StaticDecoder(oracle, 128).greedy(prompt, n_check))
        del oracle
        d_times, s_times = [], []
        for _ in range(args.repeats):  # alternate so drift hits both equally
            d_times += _step_times(dense, prompt, args.tokens)
            s_times += _step_times(sparse, prompt, args.tokens)
        row = {"sparsity": s, "expected_sparsity": plan.expected_sparsity(), "dense_tok_s": 1 / statistics.median(d_times),
               "sparse_tok_s": 1 / statistics.median(s_times), f"greedy_{n_check}_tokens_equal_oracle": same}
        row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
        rows.append(row)
        print(f"sparsity {s:.2f}: dense {row['dense_tok_s']:.1f} tok/s, sparse ({args.backend}) {row['sparse_tok_s']:.1f} tok/s, "
              f"speedup {row['speedup']:.2f}x, greedy tokens equal to oracle: {same}", flush=True)
        if args.out or args.memory:
            import tempfile

            from .artifact import save

            with tempfile.TemporaryDirectory() as d:
                save(plan, d)
                row["dense_peak_mb"] = peak_rss_mb([args.model, args.dtype, "dense", "-", args.backend])
                row["sparse_peak_mb"] = peak_rss_mb([args.model, args.dtype, "sparse", d, args.backend])
    result = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "backend": args.backend,
              "tokens": args.tokens, "repeats": args.repeats, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
    mid = min(rows, key=lambda r: abs(r["sparsity"] - 0.5))
    print(json.dumps({"dense_tok_s": mid["dense_tok_s"], "sparse_tok_s": mid["sparse_tok_s"], "speedup": mid["speedup"],
                      "sparsity": mid["sparsity"], "backend": args.backend, "dtype": args.dtype, "rows": rows}))


def _rss_child(model_name, dtype, kind, plan_dir, backend):
    import resource

    from .artifact import load as load_plan

    if kind == "dense":
        model, tok = load(model_name, dtype)
    else:
        _, tok = load(model_name, "float32")
        model = sparse_model(model_name, dtype, load_plan(plan_dir), backend)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    StaticDecoder(model, 64).greedy(prompt, 16)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_rss":
    _rss_child(*sys.argv[2:7])
