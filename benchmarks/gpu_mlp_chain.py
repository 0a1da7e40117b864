"""The sparse SiLU MLP as one launch (`kernels/mlp.py`) against the two calls it replaces, on an H200.

Why: session 25's profile (docs/perf-gpu.md) put the MLP's two calls 13.7 µs per layer over their byte
floor; the chain removes the SiLU * up epilogue's launch and lets down's programs start (compaction,
first loads) while gate|up's tail runs. Prediction: 5-7 µs per layer.

What: 8 layers of Llama-3-8B's MLP (4096 -> 2 x 14336 -> 4096), every weight distinct (read from HBM),
bf16, batch 1, r = 0, 50% of each call's channels kept (tau from each layer's own inputs: x Laplace,
h the two-call path's), captured in one CUDA graph per variant and replayed (median of 30 replays):
  two-call   `rsparse_glu_gemv` (gate|up gather + `_glu_epilogue`) then `rsparse_gemv` (down gather + `_epilogue`);
  chain ...  `rsparse_mlp` (reduce=True: the chain + one `_epilogue`) at launch settings (warps, stages, back-off ns while waiting).
Each variant's output is checked against the two-call output first (relative error). Per layer: µs, the
byte floor (kept rows' bytes / measured copy bandwidth) and its share. Prints a table, ends with one JSON
line, writes $OUT/gpu_mlp_chain.json.  `PYTHONPATH=src:benchmarks python3 benchmarks/gpu_mlp_chain.py`
"""
import json
import os
import statistics

import torch

from rsparse.gpubench import copy_bandwidth
from rsparse.kernels import mlp
from rsparse.kernels import triton_gemv as tg

H, I, LAYERS = 4096, 14336, 8
CHAIN = [(0, 0, 0), (4, 3, 0), (4, 3, 100), (4, 3, 500), (4, 2, 100)]


def _tau(scores, keep=0.5):
    return scores.float().flatten().quantile(1 - keep).reshape(())


def build(gen):
    layers = []
    for _ in range(LAYERS):
        wgu = (torch.randn(H, 2 * I, device="cuda", generator=gen) / H**0.5).to(torch.bfloat16)
        wd = (torch.randn(I, H, device="cuda", generator=gen) / I**0.5).to(torch.bfloat16)
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, H)).cuda().to(torch.bfloat16)
        cgu, cd = torch.ones(2, H, device="cuda", dtype=torch.bfloat16), torch.ones(I, device="cuda", dtype=torch.bfloat16)
        tgu = torch.stack([_tau(x.abs()), _tau(x.abs())])
        empty_gu, empty_u = wgu.new_zeros(H, 0), wgu.new_zeros(0)
        h = torch.ops.rsparse.rsparse_glu_gemv(x, wgu, empty_gu, empty_u, cgu, tgu, tg.tile_locks(2 * I, "cuda"), 0)
        td = _tau(h.abs())
        layers.append(dict(x=x, wgu=wgu, wd=wd, cgu=cgu, cd=cd, tgu=tgu, td=td, h=h,
                           kept=(H * 2 * I * ((x.abs() > tgu[0]).float().mean()) + I * H * (h.abs() > td).float().mean()).item() * 2,
                           glocks=tg.tile_locks(2 * I, "cuda"), dlocks=tg.tile_locks(H, "cuda"),
                           clocks=torch.zeros(mlp.chain_locks_needed(I, *mlp.chain_configs(wgu, wd)), dtype=torch.int32,
                                              device="cuda")))
    return layers


def two_call(L):
    h = torch.ops.rsparse.rsparse_glu_gemv(L["x"], L["wgu"], L["wgu"][:, :0], L["wgu"].new_zeros(0), L["cgu"], L["tgu"], L["glocks"], 0)
    return torch.ops.rsparse.rsparse_gemv(h, L["wd"], L["wd"][:, :0], L["wd"].new_zeros(0), L["cd"], L["td"], L["dlocks"])


def chain(L, warps, stages, sleep):
    return torch.ops.rsparse.rsparse_mlp(L["x"], L["wgu"], L["cgu"], L["tgu"], L["wd"], L["cd"], L["td"], L["clocks"], True,
                                         warps, stages, sleep)


def time_variant(fn, layers, reps=30):
    for L in layers:  # warm-up: compiles and autotunes outside the capture
        fn(L)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [fn(L) for L in layers]
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(layers))
    return statistics.median(times), outs


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    layers = build(gen)
    floor = statistics.median(L["kept"] for L in layers) / bw * 1e6
    rows, results = [], {}
    ref_t, ref = time_variant(two_call, layers)
    results["two-call"] = {"us_per_layer": ref_t, "rel_err": 0.0}
    for w, s, ns in CHAIN:
        label = f"chain w{w or 'cfg'} s{s or 'cfg'} sleep{ns}"
        try:
            t, out = time_variant(lambda L: chain(L, w, s, ns), layers)
        except Exception as e:  # a launch setting that does not compile (resources): recorded, not fatal
            results[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref))
        results[label] = {"us_per_layer": t, "rel_err": err, "vs_two_call": ref_t / t}
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; byte floor per layer {floor:.2f} us")
    print(f"{'variant':28s} {'us/layer':>9s} {'floor share':>11s} {'x two-call':>10s} {'rel err':>9s}")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:28s} {r['error']}")
            continue
        print(f"{label:28s} {r['us_per_layer']:9.2f} {floor / r['us_per_layer']:11.1%} {ref_t / r['us_per_layer']:10.3f} {r['rel_err']:9.2e}")
        rows.append(dict(variant=label, **r))
    out = {"bench": "gpu_mlp_chain", "copy_bw_TBps": bw / 1e12, "floor_us_per_layer": floor, "layers": LAYERS, "rows": rows,
           "errors": {k: v["error"] for k, v in results.items() if "error" in v}}
    path = os.path.join(os.environ.get("OUT", "."), "gpu_mlp_chain.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
