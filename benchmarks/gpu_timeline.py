"""Where a gather call's fixed cost goes: a per-program timeline of `_fused_gather_gemv` inside the step.

Why: sessions 5-15 fitted 2.7-6.0 µs of fixed cost per call (time = fixed + bytes / rate) and removed
candidates one by one (compaction prologue, L2, launch overlap by PDL in session 16), but never
looked inside a call. Here every program of every gather records, with the GPU's global nanosecond
timer, when it starts, when its compaction is done (its kept-index count known), and when its last
weight tile has been multiplied (its float32 partial about to be stored), plus the SM it ran on.

The chain: LAYERS layers of Llama-3-8B's sparse projections as the eager module path runs them (q|k|v,
o, gate|up + SiLU * up, down; a gather and an epilogue each, each call's input the previous call's
output, every weight distinct and read from HBM, batch 1, r = 0, 50% kept per call; the gathers at the
compiled path's configurations), with the gathers' timestamping twin (`_timed_gather`: `_tile_acc` and
`triton_gemv._gather` repeated line for line with stamps between; a change there belongs here too).
The stamps read %globaltimer, which advances in ~1 µs steps on this GPU (the smallest nonzero
difference seen): single-program figures are coarse, medians over programs and layers less so. Captured in one CUDA graph
and replayed; the last replay's records are read. Per call (median over layers):
  span      first program start -> last program end (the call as the SMs see it);
  ideal     the bytes its kept rows read / measured copy bandwidth;
  gap       the previous gather's end -> this one's first start (the epilogue between, and launches);
  prologue  a program's start -> its compaction done (median over programs);
  ramp      first start -> the moment 90% of the SMs have a program running;
  tail      the moment busy SMs fall below 90% for good -> last end;
  SM busy   the SMs' busy time / (SMs x span).
Also times the chain with the real kernel and with the twin (the stamps' own cost). `--variants`: the
same with finer programs on gate|up and down (chunks of 1024 and 512 channels, `FINER`). Prints a
table, ends with JSON lines; writes $OUT/gpu_timeline.json.
`cd benchmarks && PYTHONPATH=../src python3 gpu_timeline.py [--variants]`

Session 16 (`gpu_timeline_s16.json`, `gpu_timeline_s16_variants.json`): all programs start within
0.1 µs; per call, the compaction takes 1.2-1.8 µs, ~4 µs pass between dependent gathers, and the tail
(under 90% of the SMs busy) lasts 1.6-7.4 µs (gate|up), from programs of equal work streaming at
uneven rates. Finer programs (chunks 1024/512) made the chain 6-22% slower: every grid fits on the SMs
at once, so nothing is rebalanced, and co-resident compactions get slower (docs/perf-gpu.md).
"""
import json
import os
import statistics

import torch
import triton
import triton.language as tl

from rsparse.gpubench import copy_bandwidth
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.tl_common import BB, _compact_chunk, _gather_rows, _store_partial, gather_grid

H, I, KV = 4096, 14336, 1024
LAYERS, FIELDS = 8, 5
NAMES = ("q|k|v", "o", "gate|up", "down")


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
    """The compiled path's configuration of the call (the gather alone: `config_for(reduce=False)`)."""
    if segments is None:
        return tg.config_for(wt.shape[1], 0, wt.shape[0], reduce=False)
    return tg._group_cfg(*segments, wt, 0, reduce=False)


@triton.jit
def _stamp(dep):
    """%globaltimer (ns), read once `dep` (an int32 scalar) exists: the data dependence orders it."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _timed_gather(x_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, log_ptr, B, IN, OUT, LDW, SEG1, SEG2,
                  CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_fused_gather_gemv` (its `_tile_acc` spelled out) with stamps: (start, compaction done, last tile
    multiplied, SM, kept count) per program at log_ptr[program id]."""
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    t0 = _stamp(pid_n)
    rows = tl.arange(0, BB)
    n0 = pid_n * BLOCK_N
    n = n0 + tl.arange(0, BLOCK_N)
    p = (n0 >= SEG1).to(tl.int32) + (n0 >= SEG2).to(tl.int32)
    tau = tl.load(tau_ptr + p)
    cp = c_ptr + p * IN
    base = scratch_ptr + (pid_n * tl.cdiv(IN, CHUNK) + chunk) * CHUNK
    cnt = _compact_chunk(x_ptr, cp, tau, base, chunk * CHUNK + tl.arange(0, CHUNK), rows, B, IN)
    t1 = _stamp(cnt)
    acc = _gather_rows(x_ptr, cp, tau, wt_ptr, base, cnt, rows, n, B, IN, OUT, LDW, BB, BLOCK_K, BLOCK_N)
    t2 = _stamp(tl.sum(tl.sum(acc, 1), 0).to(tl.int32, bitcast=True))
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)
    lp = log_ptr + (chunk * tl.num_programs(0) + pid_n) * 5
    tl.store(lp, t0)
    tl.store(lp + 1, t1)
    tl.store(lp + 2, t2)
    tl.store(lp + 3, _smid().to(tl.int64))
    tl.store(lp + 4, cnt.to(tl.int64))


def timed_launch(logs):
    """A `_gather` stand-in for `tg._launch` that runs the twin and appends its log buffer to logs."""
    def gather(x, wt, col_scale, tau, ypart, cfg, seg1, seg2):
        B, IN = x.shape
        OUT = wt.shape[1]
        ch, bn = cfg["chunk"], cfg["block_n"]
        ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, x.device)
        log = torch.zeros(ntile * nchunk * FIELDS, dtype=torch.int64, device=x.device)
        logs.append(log)
        _timed_gather[(ntile, nchunk)](x, col_scale, tau, wt, scratch, ypart, log, B, IN, OUT, wt.stride(0), seg1, seg2,
                                       CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, num_warps=cfg["warps"],
                                       num_stages=cfg["stages"])
        return ypart
    return gather


def run_chain(layers, x0, taus=None, nbytes=None):
    """The chain from x0 (each call's input the previous call's output; q|k|v's first H columns feed o).
    taus None (calibration): set each call's threshold to keep 50% of its input's channels, count the
    bytes its kept rows read into nbytes, and scale every weight but gate|up's once so that its output
    has unit RMS (the model's RMSNorms' job: without them the GLU's x^3 makes the inputs underflow
    within a few layers and those calls read nothing); returns (output, taus) then."""
    x, fill = x0, taus is None
    taus = [] if fill else iter(taus)
    for wts in layers:
        for wt, seg, glu in calls(wts):
            x = x[:, :wt.shape[0]]
            P = 1 if seg is None else (2 if glu else 3)
            ones = torch.ones(P, wt.shape[0], device="cuda", dtype=torch.bfloat16)
            if fill:
                t = torch.quantile(x.float().abs(), 0.5).reshape(1).repeat(P)
                taus.append(t)
                nbytes.append(int((x.float().abs() > t[0]).sum()) * wt.shape[1] * 2)
            else:
                t = next(taus)
            at = torch.empty(wt.shape[0], 0, device="cuda", dtype=torch.bfloat16)
            u = torch.empty(0, device="cuda", dtype=torch.bfloat16)

            def call():
                return tg._launch(x, wt, at, u, ones if P > 1 else ones[0], t if P > 1 else t[0], None, config(wt, seg, glu),
                                  segments=seg, glu=glu)
            y = call()
            if fill and not glu:
                wt.mul_(1 / y.float().pow(2).mean().sqrt())
                y = call()
            x = y
    return (x, taus) if fill else x


def busy_profile(t0, t2, sm, nsm):
    """(ramp end, tail start, busy fraction): when >= 90% of the SMs first have a program running, when
    they last drop below 90%, and the SMs' busy time over nsm x span (union of each SM's intervals)."""
    ev = sorted([(a, 1, s) for a, s in zip(t0, sm)] + [(b, -1, s) for b, s in zip(t2, sm)], key=lambda e: (e[0], -e[1]))
    running, busy_sms, ramp_end, tail_start = {}, 0, None, None
    need = 0.9 * nsm
    for t, d, s in ev:
        before = running.get(s, 0)
        running[s] = before + d
        busy_sms += (running[s] > 0) - (before > 0)
        if ramp_end is None and busy_sms >= need:
            ramp_end = t
        if busy_sms >= need:
            tail_start = None
        elif ramp_end is not None and tail_start is None:
            tail_start = t
    per_sm = {}
    for a, b, s in zip(t0, t2, sm):
        per_sm.setdefault(s, []).append((a, b))
    busy = 0
    for iv in per_sm.values():
        iv.sort()
        cur_a, cur_b = iv[0]
        for a, b in iv[1:]:
            if a > cur_b:
                busy += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        busy += cur_b - cur_a
    span = max(t2) - min(t0)
    return ramp_end, tail_start, busy / (nsm * span)


# --variants: the same chain with finer programs on the MLP shapes (more of them, each with its own
# compaction), to see what they trade: a shorter tail against more prologues and partials
FINER = {"gate|up chunk 1024": {(28672, 4096): dict(chunk=1024, block_k=128, block_n=256, warps=8, stages=2, fused=True)},
         "gate|up chunk 512": {(28672, 4096): dict(chunk=512, block_k=128, block_n=256, warps=8, stages=2, fused=True)},
         "down chunk 1024": {(4096, 14336): dict(chunk=1024, block_k=128, block_n=128, warps=4, stages=3, fused=True)},
         "down chunk 512": {(4096, 14336): dict(chunk=512, block_k=128, block_n=128, warps=4, stages=3, fused=True)}}


def capture_chains(layers, x0, taus, gathers, after_warmup=lambda: None):
    """{name: (graph, output)}: the chain captured in one CUDA graph per `triton_gemv._gather` stand-in
    (gathers: {name: stand-in, or None for the real kernel}), each run once outside the capture first
    (compile, warm), then `after_warmup()` (e.g. dropping what the warm-up recorded)."""
    real = tg._gather
    graphs = {}
    try:
        for name, gather in gathers.items():
            tg._gather = real if gather is None else gather
            run_chain(layers, x0, taus)
            torch.cuda.synchronize()
            after_warmup()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = run_chain(layers, x0, taus)
            graphs[name] = (g, out)
    finally:
        tg._gather = real
    return graphs


def time_alternately(graphs, rounds, replays=10):
    """{name: [µs per replay]}: `rounds` rounds, each graph replayed `replays` times in turn (after one
    untimed replay), timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {k: [] for k in graphs}
    for _ in range(rounds):
        for k, (g, _) in graphs.items():
            g.replay()
            start.record()
            for _ in range(replays):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end) / replays * 1e3)
    return times


def measure(layers, x0, taus, nbytes, bw, nsm):
    """Chain times (real kernels, stamped twin) and the per-call medians of the stamped chain."""
    logs = []
    graphs = capture_chains(layers, x0, taus, {"real": None, "stamped": timed_launch(logs)}, logs.clear)
    times = time_alternately(graphs, 7)
    chain_us = {k: round(statistics.median(v), 1) for k, v in times.items()}
    same = bool(torch.equal(graphs["stamped"][1], graphs["real"][1]))
    print(f"chain µs: {chain_us}  stamped output equals real: {same}", flush=True)
    graphs["stamped"][0].replay()
    torch.cuda.synchronize()
    recs = [lg.view(-1, FIELDS).cpu().tolist() for lg in logs]
    per = {n: [] for n in NAMES}
    prev_end, res_ns = None, set()
    for i, rec in enumerate(recs):
        t0, t1, t2, sm, cnt = (list(col) for col in zip(*rec))
        res_ns.update(b - a for a, b in zip(t0, t1) if b > a)
        first, last = min(t0), max(t2)
        ramp_end, tail_start, busy = busy_profile(t0, t2, sm, nsm)
        row = dict(span=(last - first) / 1e3, ideal=nbytes[i] / bw * 1e6,
                   gap=None if prev_end is None else (first - prev_end) / 1e3,
                   prologue=statistics.median(b - a for a, b in zip(t0, t1)) / 1e3,
                   stream=statistics.median(b - a for a, b in zip(t1, t2)) / 1e3,
                   ramp=None if ramp_end is None else (ramp_end - first) / 1e3,
                   tail=None if tail_start is None else (last - tail_start) / 1e3,
                   busy=busy, programs=len(t0), sms=len(set(sm)), max_per_sm=max(sm.count(s) for s in set(sm)),
                   kept_spread=(min(cnt), max(cnt)))
        per[NAMES[i % 4]].append(row)
        prev_end = last
    print(f"timer: smallest nonzero program-level delta {min(res_ns) if res_ns else None} ns", flush=True)
    out = {}
    keys = ("span", "ideal", "gap", "prologue", "stream", "ramp", "tail", "busy")
    print(f"{'call':>8} " + " ".join(f"{k:>8}" for k in keys) + "  programs  max/SM  (µs, medians over layers)")
    for n, rows in per.items():
        med = {k: round(statistics.median(r[k] for r in rows if r[k] is not None), 3)
               if any(r[k] is not None for r in rows) else None for k in keys}
        med.update(programs=rows[0]["programs"], sms=rows[0]["sms"], max_per_sm=rows[0]["max_per_sm"],
                   kept_spread=rows[0]["kept_spread"])
        out[n] = med
        print(f"{n:>8} " + " ".join(f"{med[k]!s:>8}" for k in keys) + f"  {med['programs']:>8}  {med['max_per_sm']:>6}")
    return dict(chain_us=chain_us, stamped_equals_real=same, calls=out, timer_min_delta_ns=min(res_ns) if res_ns else None,
                raw_layer1={n: recs[4 + i] for i, n in enumerate(NAMES)} if len(recs) > 7 else None)


def main():
    import sys

    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device {torch.cuda.get_device_name()}  {nsm} SMs  copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    layers = [layer_weights(gen) for _ in range(LAYERS)]
    x0 = torch.distributions.Laplace(0.0, 1.0).sample((1, H)).to("cuda", torch.bfloat16)
    nbytes = []
    _, taus = run_chain(layers, x0, None, nbytes)
    result = dict(bench="gpu_timeline", device=torch.cuda.get_device_name(), sms=nsm, copy_tb_s=round(bw / 1e12, 3),
                  layers=LAYERS, **measure(layers, x0, taus, nbytes, bw, nsm))
    if "--variants" in sys.argv:
        saved = dict(tg.TUNED)
        result["variants"] = {}
        for name, tuned in FINER.items():
            print(f"\n{name}", flush=True)
            tg.TUNED.update(tuned)
            try:
                v = measure(layers, x0, taus, nbytes, bw, nsm)
            finally:
                tg.TUNED.clear()
                tg.TUNED.update(saved)
            v.pop("raw_layer1")
            result["variants"][name] = v
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_timeline.json"), "w") as fh:
            json.dump(result, fh)
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw_layer1", "variants")}))
    for name, v in result.get("variants", {}).items():
        print(json.dumps({"variant": name, "chain_us": v["chain_us"], **{n: v["calls"][n] for n in ("gate|up", "down")}}))


if __name__ == "__main__":
    main()
