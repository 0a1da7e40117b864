"""The compiled CPU decode step with and without dynamo's guard checks, side by side.

A torch.compile'd step checks its guards (the inputs' shapes, dtypes, the modules it read) on every
call before running the compiled code; session 15's profile put that at ~1.2 ms of a ~25 ms step on
SmolLM2-135M. The decode loop calls one graph with inputs of fixed shapes, so after the first
(compiling) step the checks only cost time: `CompiledDecoder(skip_guards=True)` runs the later steps
under `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`. Dense and the 50% plan (C++ backend),
each compiled once, timed alternately with the checks on and off (5 repeats x 48 tokens, medians);
also checks that both give the same greedy tokens. Prints a table, ends with one JSON line; `--out`
writes the JSON. `PYTHONPATH=src python3 benchmarks/cpu_compile_guards.py [--out FILE]`

Session 16: this script (`cpu_compile_guards_s16.json`): dense 31.1 -> 31.9 tok/s (+2.7%), sparse
44.5 -> 47.5 (+6.9%), the same tokens, sparse / dense 1.43 -> 1.49; an ad hoc run before it
(`cpu_compile_guards_s16_run1.json`): dense 32.5 -> 34.0 (+4.5%), sparse 45.1 -> 47.2 (+4.8%), 1.39 both.
"""
import json
import statistics
import sys
import time

import torch

from rsparse.atomic import write_json
from rsparse.bench import PROMPT, TransposedLinear, _decode_times, fastest_dense_, sparse_model
from rsparse.decode import CompiledDecoder
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import RSparseConfig, build_plan

TOKENS, REPEATS = 48, 5


def main():
    dense, tok = load()
    layout = fastest_dense_(dense)
    calib, _ = load()
    plan = build_plan(calib, observe(calib, tok, tokens=2048, scores=("abs",)), RSparseConfig(sparsity=0.5))
    sparse = sparse_model("smollm2-135m", "float32", plan, "cpp")
    if layout["lm_head"] != "F.linear":  # the dense baseline's lm_head layout, as `rsparse bench` does
        sparse.lm_head = TransposedLinear(sparse.lm_head)
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    decs, compile_s = {}, {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        t0 = time.perf_counter()
        decs[name] = CompiledDecoder(model, max_len=prompt.shape[1] + TOKENS + 1, skip_guards=True)
        _decode_times(decs[name], prompt, TOKENS)  # compiles
        compile_s[name] = time.perf_counter() - t0
    times = {f"{n}_{mode}": [] for n in decs for mode in ("checked", "skipped")}
    for _ in range(REPEATS):
        for name, dec in decs.items():
            for mode in ("checked", "skipped"):
                dec.skip_guards = mode == "skipped"
                times[f"{name}_{mode}"] += _decode_times(dec, prompt, TOKENS)
    same = {}
    for name, dec in decs.items():
        toks = {}
        for mode in ("checked", "skipped"):
            dec.skip_guards = mode == "skipped"
            toks[mode] = torch.cat(list(dec.stream_greedy(prompt, 16)), 1)
        same[name] = bool(torch.equal(toks["checked"], toks["skipped"]))
    tok_s = {k: 1 / statistics.median(v) for k, v in times.items()}
    print("step      guards checked  guards skipped  gain   same tokens")
    for name in decs:
        c, s = tok_s[f"{name}_checked"], tok_s[f"{name}_skipped"]
        print(f"{name:8s} {c:13.1f} {s:15.1f} {s / c - 1:+6.1%}   {same[name]}")
    out = {"model": "smollm2-135m", "sparsity": 0.5, "threads": torch.get_num_threads(), "tokens": TOKENS, "repeats": REPEATS,
           "tok_s": tok_s, "compile_s": compile_s, "same_tokens": same,
           "speedup_checked": tok_s["sparse_checked"] / tok_s["dense_checked"],
           "speedup_skipped": tok_s["sparse_skipped"] / tok_s["dense_skipped"]}
    if "--out" in sys.argv:
        write_json(sys.argv[sys.argv.index("--out") + 1], out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
