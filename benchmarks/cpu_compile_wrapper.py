"""The compiled CPU decode step with inductor's Python wrapper against its C++ wrapper, side by side.

A torch.compile'd step (`GraphDecoder`) of SmolLM2-135M at 50% makes ~400 calls per token from its
wrapper (120 C++ kernel calls, 30 SDPA, the lm_head, allocations and views); session 15's profile put
the Python wrapper's own time at ~5 ms of a ~25 ms step. Same model, same plan, both compiled in one
process, timed alternately (5 repeats x 32 tokens, medians); also checks that both give the eager
decoder's greedy tokens. Prints a table, ends with one JSON line; `--out` writes the JSON.
`PYTHONPATH=src python3 benchmarks/cpu_compile_wrapper.py [--out FILE]`
"""
import json
import statistics
import sys
import time

import torch
import torch._inductor.config as inductor_config

from rsparse.atomic import write_json
from rsparse.bench import PROMPT, TransposedLinear, sparse_model
from rsparse.decode import GraphDecoder, StaticDecoder
from rsparse.models import load
from rsparse.pipeline import observe
from rsparse.plan import RSparseConfig, build_plan

TOKENS, REPEATS = 32, 5


def timer(model, prompt, cpp_wrapper):
    dec = GraphDecoder(model, max_len=prompt.shape[1] + TOKENS + 1)
    step = torch.compile(dec.step, dynamic=False)

    @torch.inference_mode()
    def run():
        logits, out, toks = dec.prefill(prompt), [], []
        for _ in range(TOKENS):
            ids = logits.argmax(-1, keepdim=True)
            toks.append(ids)
            t = time.perf_counter()
            logits = step(ids, torch.tensor([dec.pos]))
            out.append(time.perf_counter() - t)
            dec.pos += 1
        return out, torch.cat(toks, 1)

    t0 = time.perf_counter()
    with inductor_config.patch(cpp_wrapper=cpp_wrapper):
        run()  # compiles under this wrapper setting
    return run, time.perf_counter() - t0


def main():
    model, tok = load()
    stats = observe(model, tok, tokens=4096, scores=("abs",))
    plan = build_plan(model, stats, RSparseConfig(sparsity=0.5))
    prompt = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])

    def fresh():
        m = sparse_model("smollm2-135m", "float32", plan, "cpp")
        m.lm_head = TransposedLinear(m.lm_head)
        return m

    ref = StaticDecoder(fresh(), prompt.shape[1] + TOKENS + 1).greedy(prompt, TOKENS)
    runs = {name: timer(fresh(), prompt, cpp) for name, cpp in (("python_wrapper", False), ("cpp_wrapper", True))}
    times = {name: [] for name in runs}
    same = {}
    for _ in range(REPEATS):
        for name, (run, _) in runs.items():
            t, toks = run()
            times[name] += t
            same[name] = int((toks == ref).all(0).long().cumprod(0).sum())  # leading greedy tokens equal to eager
    res = {name: {"ms_per_token": statistics.median(t) * 1e3, "compile_s": runs[name][1], "greedy_equal_tokens": same[name]}
           for name, t in times.items()}
    res["cpp_over_python_speedup"] = res["python_wrapper"]["ms_per_token"] / res["cpp_wrapper"]["ms_per_token"]
    print("wrapper          ms/token  compile s  greedy tokens equal to eager")
    for name in runs:
        r = res[name]
        print(f"{name:15s} {r['ms_per_token']:9.2f} {r['compile_s']:10.0f}  {r['greedy_equal_tokens']}/{TOKENS}")
    out = {"model": "smollm2-135m", "sparsity": 0.5, "threads": torch.get_num_threads(), "tokens": TOKENS,
           "repeats": REPEATS, **res}
    if "--out" in sys.argv:
        write_json(sys.argv[sys.argv.index("--out") + 1], out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
