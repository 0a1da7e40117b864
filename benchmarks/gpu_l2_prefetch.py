"""Can the DRAM time that decode attention leaves idle load the next projection into L2?

In the compiled 50% step (session 13's profile) a layer's attention takes ~8 µs on ~1 MB: a latency
chain with DRAM almost idle, and right after it the o_proj gather reads half of a 32 MiB weight at
~39% of copy bandwidth (10.2 µs, `gpu_prologue_s15.json`). The whole o_proj weight fits in the H200's
L2. If a prefetch issued before attention (fire-and-forget L2 prefetches: the programs exit at once,
the fills proceed while attention runs) lands o_proj in L2, the gather reads L2 instead of DRAM.
Prediction: the o gather 10.2 -> ~5 µs, attention +0-1 µs (its loads queue behind the fills), the
prefetch launch ~1.5 µs: ~3-4 µs per layer, ~0.1 ms per step (~3%); more if the prefetch rides in
attention's own launch.

Times, per sequence of one layer's calls, over 4 weight copies and 4 caches cycled inside one CUDA
graph (so nothing is in L2 from the previous call): attention then gather ("base"); an L2 prefetch of
the weight, attention, gather ("pre", per 128-byte line or `cp.async.bulk.prefetch` spans); the same
weight every time ("hot": the gather's L2 floor); and each kernel alone. Llama-3-8B heads (32/8, head
dim 128), 257 filled slots of 512, o_proj 4096x4096 at 50%, batch 1, bf16; the gather checked against
the float32 oracle. Prints a table, ends with one JSON line; writes $OUT/gpu_l2_prefetch.json.
`PYTHONPATH=src python3 benchmarks/gpu_l2_prefetch.py`

Session 15 (`gpu_l2_prefetch_s15.json`): refuted. With the weight in L2 the gather still takes 8.0 µs
(10.0 from DRAM): at this shape it is bound by its latency chain, not DRAM. The prefetch launches cost
4.1 µs (bulk) and 7.9 µs (lines), and the gather after them was no faster. Not built into the step.
"""
import json

import torch
import triton
import triton.language as tl

from gpu_kernels import _write, bench
from rsparse.attend import attention_splits
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.attention import decode_attention
from rsparse.linear import rsparse_linear_ref

H, HKV, D, SLOTS, FILLED, COPIES = 32, 8, 128, 512, 257, 4


@triton.jit
def _prefetch_lines(ptr, NBYTES, PER: tl.constexpr):
    """One `prefetch.global.L2::evict_last` per 128-byte line, PER lines per program."""
    line = tl.program_id(0) * PER + tl.arange(0, PER)
    off = tl.minimum(line.to(tl.int64) * 128, NBYTES - 128)  # past the end: prefetch the last line again
    addr = (ptr.to(tl.pointer_type(tl.int8)) + off).to(tl.int64)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_bulk(ptr, NBYTES, SPAN: tl.constexpr, PER: tl.constexpr):
    """One `cp.async.bulk.prefetch.L2.global` of SPAN bytes (a multiple of 16) per lane, PER per program."""
    span = tl.program_id(0) * PER + tl.arange(0, PER)
    off = tl.minimum(span.to(tl.int64) * SPAN, NBYTES - SPAN)
    addr = (ptr.to(tl.pointer_type(tl.int8)) + off).to(tl.int64)
    size = tl.full([PER], SPAN, tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r", [addr, size],
                              dtype=tl.int32, is_pure=False, pack=1)


def prefetch(w, mode):
    """Issue L2 prefetches of all of w's bytes: ("lines", per) or ("bulk", span, per)."""
    nbytes = w.numel() * w.element_size()
    if mode[0] == "lines":
        per = mode[1]
        _prefetch_lines[(triton.cdiv(nbytes // 128, per),)](w, nbytes, PER=per, num_warps=4)
    else:
        span, per = mode[1], mode[2]
        _prefetch_bulk[(triton.cdiv(nbytes // span, per),)](w, nbytes, SPAN=span, PER=per, num_warps=1)


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}  L2 {props.L2_cache_size / 2**20:.0f} MiB", flush=True)
    out_f = in_f = H * D
    Wts = [(torch.randn(in_f, out_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
    ones = torch.ones(in_f, device="cuda", dtype=dt)
    tau = torch.quantile(x.float().abs(), 0.5).reshape(())
    cfg = tg.config_for(out_f, 0, in_f, reduce=False)
    ypart = torch.empty(triton.cdiv(in_f, cfg["chunk"]), 1, out_f, device="cuda")
    ref = rsparse_linear_ref(x.float(), Wts[0].t().float(), None, tau, ones.float(),
                             torch.empty(out_f, 0, device="cuda"), torch.empty(0, in_f, device="cuda"))
    q = torch.randn(1, 1, H, D, device="cuda").transpose(1, 2).to(dt)
    caches = [(torch.randn(1, HKV, SLOTS, D, device="cuda").to(dt), torch.randn(1, HKV, SLOTS, D, device="cuda").to(dt))
              for _ in range(COPIES)]
    pos = torch.tensor([FILLED - 1], device="cuda")
    splits = attention_splits(1, HKV)

    def gather(w):
        return tg._gather(x, w, ones, tau, ypart, cfg, out_f, out_f)

    def attn(i):
        return decode_attention(q, *caches[i], pos, splits)

    modes = {"lines128": ("lines", 128), "lines512": ("lines", 512), "bulk4k": ("bulk", 4096, 32),
             "bulk16k": ("bulk", 16384, 32), "bulk64k": ("bulk", 65536, 8)}
    for m in modes.values():  # a prefetch must not change what the gather computes
        prefetch(Wts[0], m)
    err = ((gather(Wts[0]).sum(0) - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    torch.cuda.synchronize()
    seqs = {
        "gather alone": lambda: [gather(w) for w in Wts],
        "gather alone, hot": lambda: [gather(Wts[0]) for _ in Wts],
        "attention alone": lambda: [attn(i) for i in range(COPIES)],
        "base: attention, gather": lambda: [(attn(i), gather(w)) for i, w in enumerate(Wts)],
        "hot: attention, gather (same weight)": lambda: [(attn(i), gather(Wts[0])) for i in range(COPIES)],
    }
    for name, m in modes.items():
        seqs[f"prefetch {name} alone"] = lambda m=m: [prefetch(w, m) for w in Wts]
        seqs[f"pre {name}: prefetch, attention, gather"] = lambda m=m: [(prefetch(w, m), attn(i), gather(w))
                                                                         for i, w in enumerate(Wts)]
        seqs[f"pre {name}: prefetch, gather"] = lambda m=m: [(prefetch(w, m), gather(w)) for w in Wts]
    rows = []
    for name, fn in seqs.items():
        try:
            us = bench(fn, rep=200)
        except Exception as e:  # a mode the toolchain rejects is reported, not fatal
            print(f"{name}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append({"sequence": name, "us": us})
        print(f"{name:48s} {us:8.2f} us", flush=True)
    t = {r["sequence"]: r["us"] for r in rows}
    base = t.get("base: attention, gather")
    best = min((r for r in rows if r["sequence"].endswith("prefetch, attention, gather")), key=lambda r: r["us"], default=None)
    summary = {"L2_MiB": props.L2_cache_size / 2**20, "base_us": base, "hot_us": t.get("hot: attention, gather (same weight)"),
               "best_prefetch": best and best["sequence"], "best_prefetch_us": best and best["us"],
               "saved_us_per_layer": best and base and base - best["us"]}
    _write("gpu_l2_prefetch.json", {**summary, "rows": rows, "gather_rel_err": err, "cfg": cfg, "splits": splits})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
