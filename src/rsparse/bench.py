"""`rsparse bench --device cpu`: decode speed of dense vs sparsified models, batch 1, static KV cache.

Dense is the fastest plain PyTorch decode of the same model we found (same dtype, threads and
`StaticDecoder`): on this CPU, PyTorch's one-row GEMV speed depends on the weight layout (F.linear on
W (out, in) vs x @ W^T stored (in, out): 1.9x apart on the lm_head, either way round depending on the
shape), so `fastest_dense_` times both layouts on the model's own layers and keeps the faster one per
projection type and for the lm_head; the sparse model gets the same lm_head choice. sparse is the same decoder with every planned projection on the C++
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


class TransposedLinear(torch.nn.Module):
    """A dense linear layer stored as W^T (in, out): y = x @ W^T + b (plain PyTorch matmul)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.wt = torch.nn.Parameter(lin.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = lin.bias

    def forward(self, x):
        y = x @ self.wt
        return y if self.bias is None else y + self.bias


def _time_layers(mods, x, repeats=5):
    with torch.no_grad():
        for m in mods:
            m(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            for m in mods:  # the layers of one type in turn: their weights are not all in cache
                m(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def fastest_dense_(model, only_head: bool = False) -> dict:
    """Give each projection type (and the lm_head) the faster dense layout, in place; returns the choice."""
    from .families import locate, set_module

    groups: dict[str, list] = {}
    if not only_head:
        for key, m in locate(model).items():
            if type(m) is torch.nn.Linear:
                groups.setdefault(key.split(".")[1], []).append((key, m))
    head = model.get_output_embeddings()
    choice = {}
    for name, items in list(groups.items()) + [("lm_head", [("lm_head", head)])]:
        mods = [m for _, m in items]
        x = torch.randn(1, 1, mods[0].in_features, dtype=mods[0].weight.dtype)
        alt = [TransposedLinear(m) for m in mods]
        use_t = _time_layers(alt, x) < _time_layers(mods, x)
        choice[name] = "x @ W^T" if use_t else "F.linear"
        if use_t:
            for (key, _), new in zip(items, alt):
                if key == "lm_head":
                    model.lm_head = new
                else:
                    set_module(model, key, new)
    return choice


def sparse_model(name, dtype, plan, backend):
    """A fresh copy of the model in `dtype` with `plan` applied, on `backend` ("cpp" or "oracle")."""
    model, _ = load(name, dtype)
    sparsify_(model, plan)
    if backend == "cpp":
        from .kernels.cpu import to_cpu_backend_

        to_cpu_backend_(model)
    return model


def _logits_agreement(a, b, prompt, steps):
    """Max relative logit error of model a vs model b, teacher-forced on b's greedy tokens."""
    da, db = StaticDecoder(a, prompt.shape[1] + steps + 1), StaticDecoder(b, prompt.shape[1] + steps + 1)
    la, lb = da.prefill(prompt), db.prefill(prompt)
    worst = 0.0
    for _ in range(steps):
        worst = max(worst, ((la - lb).norm() / lb.norm()).item())
        tok = lb.argmax(-1, keepdim=True)
        la, lb = da.forward(tok), db.forward(tok)
    return worst


def peak_rss_mb(args_list) -> float:
    """Peak resident memory (MB, VmHWM) of a fresh process running `python -m rsparse.bench _rss ...`."""
    out = subprocess.run([sys.executable, "-m", "rsparse.bench", "_rss", *args_list], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_bench(args):
    if args.device != "cpu":
        raise RSparseError("rsparse bench measures --device cpu; GPU decode is benchmarks/gpu_decode.py (needs a CUDA machine)")
    if args.backend not in ("cpp", "oracle"):
        raise RSparseError(f"unknown backend {args.backend!r}; use cpp or oracle")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense, tok = load(args.model, args.dtype)
    layout = fastest_dense_(dense)
    print(f"dense baseline layouts: {layout}", flush=True)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    calib, _ = load(args.model, "float32")
    stats = observe(calib, tok, tokens=args.calib_tokens, scores=("abs",))
    rows = []
    for s in sparsities:
        plan = build_plan(calib, stats, RSparseConfig(sparsity=s))
        sparse = sparse_model(args.model, args.dtype, plan, args.backend)
        oracle = sparse_model(args.model, args.dtype, plan, "oracle")
        n_check = 64
        with torch.no_grad():
            ours, ref = StaticDecoder(sparse, 128).greedy(prompt, n_check), StaticDecoder(oracle, 128).greedy(prompt, n_check)
        same = torch.equal(ours, ref)
        first_diff = n_check if same else int((ours != ref).nonzero()[0, 1])
        logit_err = _logits_agreement(sparse, oracle, prompt, n_check)
        del oracle
        if layout["lm_head"] != "F.linear":  # the same (unsparsified) lm_head layout as the dense baseline
            sparse.lm_head = TransposedLinear(sparse.lm_head)
        d_times, s_times = [], []
        for _ in range(args.repeats):  # alternate so drift hits both equally
            d_times += _step_times(dense, prompt, args.tokens)
            s_times += _step_times(sparse, prompt, args.tokens)
        row = {"sparsity": s, "expected_sparsity": plan.expected_sparsity(), "dense_tok_s": 1 / statistics.median(d_times),
               "sparse_tok_s": 1 / statistics.median(s_times), f"greedy_{n_check}_tokens_equal_oracle": same,
               "greedy_tokens_equal_before_first_difference": first_diff, "max_rel_logit_err_vs_oracle": logit_err}
        row["speedup"] = row["sparse_tok_s"] / row["dense_tok_s"]
        rows.append(row)
        print(f"sparsity {s:.2f}: dense {row['dense_tok_s']:.1f} tok/s, sparse ({args.backend}) {row['sparse_tok_s']:.1f} tok/s, "
              f"speedup {row['speedup']:.2f}x; vs oracle: {first_diff}/{n_check} greedy tokens equal, "
              f"max rel logit error {logit_err:.1e} (teacher-forced)", flush=True)
        if args.out or args.memory:
            import tempfile

            from .artifact import save

            with tempfile.TemporaryDirectory() as d:
                save(plan, d)
                row["dense_peak_mb"] = peak_rss_mb([args.model, args.dtype, "dense", "-", args.backend])
                row["sparse_peak_mb"] = peak_rss_mb([args.model, args.dtype, "sparse", d, args.backend])
    result = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(), "backend": args.backend,
              "dense_layouts": layout,
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
    from .artifact import load as load_plan

    if kind == "dense":
        model, tok = load(model_name, dtype)
        fastest_dense_(model)
    else:
        _, tok = load(model_name, "float32")
        model = sparse_model(model_name, dtype, load_plan(plan_dir), backend)
        fastest_dense_(model, only_head=True)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        StaticDecoder(model, 64).greedy(prompt, 16)
    # peak of this process's own memory map (VmHWM); ru_maxrss would carry the parent's peak across exec
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 1024)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "_rss":
    _rss_child(*sys.argv[2:7])
