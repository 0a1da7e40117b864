"""Programmatic dependent launch (PDL) across the decode step's kernels: does letting each kernel's
programs be scheduled before the previous kernel ends cut the per-call fixed cost?

Why: session 15 put 2.7-6.0 µs of fixed cost on every gather call (128 per Llama-3-8B step) and found
it in no single kernel's code (not the compaction prologue, not DRAM): what is left is each launch's
start and each kernel's tail, i.e. work across kernel boundaries. On Hopper a kernel launched with the
PDL attribute may start while its predecessor runs; its programs wait (`griddepcontrol.wait`, in
`tl_common._pdl_enter`) before their first global access, so the result is unchanged; a predecessor
that calls `griddepcontrol.launch_dependents` early lets them be resident when it ends.

The chain: 32 layers of Llama-3-8B's sparse projections as the eager module path runs them (q|k|v
group, o, gate|up with SiLU(gate) * up in its epilogue, down: a gather and an epilogue each, 8
launches per layer, 256 in all), each call's input the previous call's output (q|k|v's first 4096
columns feed o), real Llama-3-8B-sized random bf16 weights per layer (14 GB: every read from HBM), batch
1, r = 0, each call's threshold set on its own input for 50% kept; each weight but gate|up's is scaled
once, before the timing, so that its output has unit RMS (the model's RMSNorms' job: without them the
GLU's x^3 makes the inputs underflow within a few layers, and those calls read nothing; run 1 of
session 16, 0.24 of the dense bytes, was such a run). Captured in one CUDA graph per
variant and replayed alternately (median of repeats):
  pdl 0  plain launches (as today);
  pdl 2  PDL launches, each program waits first, no early trigger (the next kernel may be scheduled
         only as this one's programs end);
  pdl 1  PDL launches, each program waits first and then triggers its dependents at once.
Every variant's final output is checked bit for bit against pdl 0 (the kernels are deterministic: a
race would show). Prints a table, ends with one JSON line; writes $OUT/gpu_pdl.json.
`PYTHONPATH=src python3 benchmarks/gpu_pdl.py`
"""
import json
import os
import statistics

import torch

from rsparse.gpubench import copy_bandwidth
from rsparse.kernels import triton_gemv as tg

H, I, KV, LAYERS = 4096, 14336, 1024, 32
REPEATS, REPLAYS = 9, 20


def layer_weights(gen):
    """Wt (in, out) of one layer's four calls: q|k|v, o, gate|up, down."""
    def w(i, o):
        return (torch.randn(i, o, device="cuda", generator=gen) / i**0.5).to(torch.bfloat16)
    return [w(H, H + 2 * KV), w(H, H), w(H, 2 * I), w(I, H)]


def calls(wts):
    """[(wt, segments, glu)] per layer: the four calls with the eager path's group arguments."""
    qkv, o, gu, down = wts
    return [(qkv, (H, H + KV), False), (o, None, False), (gu, (I, 2 * I), True), (down, None, False)]


def config(wt, segments, glu):
    if segments is None:
        return tg.config_for(wt.shape[1], 0, wt.shape[0], reduce=False)
    return tg._group_cfg(*segments, wt, 0, reduce=False)


def chain(layers, x0, taus, pdl, bytes_out=None):
    """The 32-layer chain from x0; taus None: set each call's threshold (50% of its input's channels)
    and count the bytes its kept rows read into bytes_out."""
    x = x0
    fill = taus is None
    taus = [] if fill else iter(taus)
    for wts in layers:
        for wt, seg, glu in calls(wts):
            x = x[:, :wt.shape[0]]
            P = 1 if seg is None else (2 if glu else 3)
            ones = torch.ones(P, wt.shape[0], device="cuda", dtype=torch.bfloat16)
            if fill:
                t = torch.quantile(x.float().abs(), 0.5).reshape(1).repeat(P)
                taus.append(t)
                bytes_out.append(int((x.float().abs() > t[0]).sum()) * wt.shape[1] * 2)
            else:
                t = next(taus)
            at = torch.empty(wt.shape[0], 0, device="cuda", dtype=torch.bfloat16)
            u = torch.empty(0, device="cuda", dtype=torch.bfloat16)

            def call():
                return tg._launch(x, wt, at, u, ones if P > 1 else ones[0], t if P > 1 else t[0], None,
                                  config(wt, seg, glu), segments=seg, glu=glu, pdl=pdl)
            y = call()
            if fill and not glu:  # rescale the weight to unit-RMS outputs (what the model's RMSNorms do),
                wt.mul_(1 / y.float().pow(2).mean().sqrt())  # else the GLU's x^3 makes x underflow in a few layers
                y = call()
            x = y
    return (x, taus) if fill else x


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    layers = [layer_weights(gen) for _ in range(LAYERS)]
    x0 = torch.distributions.Laplace(0.0, 1.0).sample((1, H)).to("cuda", torch.bfloat16)
    nbytes = []
    ref, taus = chain(layers, x0, None, 0, nbytes)
    graphs, outs = {}, {}
    for pdl in (0, 2, 1):
        chain(layers, x0, taus, pdl)  # compile and warm outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs[pdl] = chain(layers, x0, taus, pdl)
        graphs[pdl] = g
    times = {p: [] for p in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(REPEATS):
        for p, g in graphs.items():
            g.replay()
            start.record()
            for _ in range(REPLAYS):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            times[p].append(start.elapsed_time(end) / REPLAYS * 1e3)  # µs per chain
    total = sum(nbytes)
    dense = LAYERS * 2 * H * (H + 2 * KV + H + 2 * I + I)
    print(f"bytes the kept rows read: {total / 1e9:.2f} GB, {total / dense:.3f} of the dense weights", flush=True)
    rows, res = [], {}
    base = statistics.median(times[0])
    for p in graphs:
        graphs[p].replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(outs[p], outs[0])) and bool(torch.equal(outs[0], ref))
        us = statistics.median(times[p])
        res[p] = dict(us_per_chain=round(us, 1), us_per_launch=round(us / (8 * LAYERS), 3),
                      saved_per_launch_us=round((base - us) / (8 * LAYERS), 3), copy_frac=round(total / (us * 1e-6) / bw, 3),
                      bitwise_equal=same, spread=[round(min(times[p]), 1), round(max(times[p]), 1)])
        rows.append((p, res[p]))
    print(f"{'pdl':>4} {'µs/chain':>9} {'µs/launch':>9} {'saved/launch':>12} {'copy':>6} {'equal':>6}  spread")
    for p, r in rows:
        print(f"{p:>4} {r['us_per_chain']:>9} {r['us_per_launch']:>9} {r['saved_per_launch_us']:>12} {r['copy_frac']:>6} "
              f"{str(r['bitwise_equal']):>6}  {r['spread']}")
    result = dict(bench="gpu_pdl", device=torch.cuda.get_device_name(), copy_tb_s=round(bw / 1e12, 3),
                  launches=8 * LAYERS, bytes=total, kept_byte_frac=round(total / dense, 4), variants={str(k): v for k, v in res.items()})
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_pdl.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
