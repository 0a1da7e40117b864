"""Is the residual add + RMSNorm worth fusing into the gathers? (session 30; costed in session 29)

Today's compiled decode step runs, after o_proj and after down_proj, one inductor kernel that sums the
gather's float32 partials, adds the residual and applies RMSNorm (2.6-3.3 µs each, 64 per step on
Llama-3-8B shapes, session 24's profile). The fusion would remove it:
  - the producing call finishes its own sum (the split kernel's last-ticket program, `splitk`) and adds
    the residual there (timed here as the split kernel's bias: the same one (OUT,) load per tile at
    batch 1);
  - the next gather computes the norm in its prologue: every program reads the whole residual row
    (8 KB) from L2, forms r = rsqrt(mean(h^2) + eps) and writes x = w * round(h r) for its own chunk,
    then compacts and gathers as today (`_normed_gather` below, r = 0, one member).

Two chains per norm site, each in one CUDA graph over 4 weight copies (weights from HBM):
  today:  gather(producer) -> inductor(sum partials + residual + RMSNorm) -> gather(consumer)
  fused:  split kernel(producer, + residual)                           -> normed gather(consumer)
sites: o (4096x4096) -> gate|up (28672x4096), down (4096x14336) -> q|k|v (6144x4096); batch 1, bf16,
50% kept per call, the launch configurations the compiled step uses (`triton_gemv.config_for(...,
reduce=False)`). Also each part alone. Prediction (session 29): ~2 µs saved per site, 3-4% of the step.
Every result is checked against a float64 oracle first. Prints a table, ends with one JSON line
($OUT/gpu_norm_prologue.json if OUT is set). Without CUDA: a correctness check of the two new paths
on small shapes under TRITON_INTERPRET=1 (float16, no timing).
"""
import os
import sys

import torch
import triton
import triton.language as tl

from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.splitk import launch_splitk
from rsparse.kernels.tl_common import BB, _store_partial, _tile_acc, gather_grid

EPS = 1e-5
COPIES = 4


@triton.jit
def _normed_gather(h_ptr, g_ptr, xn_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, ypart_ptr, B, IN, OUT, LDW, EPS,
                   CHUNK: tl.constexpr, BB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, NP2: tl.constexpr):
    """`_fused_gather_gemv` (one member) whose input is RMSNorm(h) with weight g, formed in the prologue:
    each program reads every row of h whole for its rsqrt(mean(h^2) + eps) and writes x for its own
    chunk into xn (programs of the same chunk write the same values; a program reads back only what it
    wrote, after the CTA barrier in the compaction). Rounded like LlamaRMSNorm: w * round(h r)."""
    pid_n, chunk = tl.program_id(0), tl.program_id(1)
    k = tl.arange(0, NP2)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    dt = xn_ptr.dtype.element_ty
    gc = tl.load(g_ptr + offs, mask=offs < IN, other=0.0).to(tl.float32)
    for b in range(0, B):
        v = tl.load(h_ptr + b * IN + k, mask=k < IN, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / IN + EPS)
        hc = tl.load(h_ptr + b * IN + offs, mask=offs < IN, other=0.0).to(tl.float32)
        tl.store(xn_ptr + b * IN + offs, (gc * (hc * r).to(dt).to(tl.float32)).to(dt), mask=offs < IN)
    tl.debug_barrier()
    acc = _tile_acc(xn_ptr, c_ptr, tau_ptr, wt_ptr, scratch_ptr, pid_n, chunk, B, IN, OUT, LDW, OUT, OUT,
                    CHUNK, BB, BLOCK_K, BLOCK_N)
    _store_partial(ypart_ptr, acc, chunk, pid_n, B, OUT, BB, BLOCK_N)


def normed_gather(h, g, wt, c, tau, cfg, xn, ypart):
    """Float32 partials (chunks, rows, out) of RMSNorm(h; g) @ Wt through `_normed_gather`."""
    B, IN = h.shape
    OUT = wt.shape[1]
    ch, bn = cfg["chunk"], cfg["block_n"]
    ntile, nchunk, scratch = gather_grid(IN, OUT, cfg, h.device)
    _normed_gather[(ntile, nchunk)](h, g, xn, c, tau, wt, scratch, ypart, B, IN, OUT, wt.stride(0), EPS,
                                    CHUNK=ch, BB=BB, BLOCK_K=cfg["block_k"], BLOCK_N=bn, NP2=triton.next_power_of_2(IN),
                                    num_warps=cfg["warps"], num_stages=cfg["stages"])
    return ypart


def rms_ref(h, g):
    """LlamaRMSNorm in float64 from h's values, rounded like the module (w * round(h r)) to h's dtype."""
    hf = h.double()
    t = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype).double()
    return (g.double() * t).to(h.dtype)


def gemv_ref(x, wt, tau):
    """The r = 0 oracle in float64: channels with |x_j| > tau (unit scales) times their Wt rows."""
    xf = x.double()
    return torch.where(xf.abs() > tau.double(), xf, 0.0) @ wt.double()


def partials(in_f, out_f, cfg, dev):
    """The float32 partials (chunks, 1, out) of one batch-1 gather."""
    return torch.empty(triton.cdiv(in_f, cfg["chunk"]), 1, out_f, dtype=torch.float32, device=dev)


def case(out_f, in_f, dev, dt):
    """COPIES weights (Wt layout), unit scales, bias-free."""
    return [(torch.randn(in_f, out_f, device=dev) / in_f**0.5).to(dt) for _ in range(COPIES)], torch.ones(in_f, device=dev, dtype=dt)


def site(prod, cons, dev, dt, cfgs, timed: bool) -> dict:
    """One norm site: producer (out, in) -> residual + RMSNorm -> consumer (out, in)."""
    (po, pi), (co, ci) = prod, cons
    assert po == ci
    pw, pc = case(po, pi, dev, dt)
    cw, cc = case(co, ci, dev, dt)
    px = torch.distributions.Laplace(0.0, 1.0).sample((1, pi)).to(dev, dt)
    ptau = torch.quantile(px.float().abs(), 0.5).reshape(())
    resid = torch.randn(1, po, device=dev).to(dt)
    g = (1 + 0.1 * torch.randn(po, device=dev)).to(dt)
    # the consumer's threshold keeps about half of the normed channels
    h_true = (resid.double() + gemv_ref(px, pw[0], ptau)).to(dt)
    ctau = torch.quantile(rms_ref(h_true, g).float().abs(), 0.5).reshape(())
    pcfg, ccfg = cfgs[prod], cfgs[cons]
    splits = triton.cdiv(pi, pcfg["chunk"])
    scfg = dict(pcfg, splits=splits)
    ppart, cpart = partials(pi, po, pcfg, dev), partials(ci, co, ccfg, dev)
    locks = tg.tile_locks(po, dev)
    hbuf, xn = torch.empty(1, po, device=dev, dtype=dt), torch.empty(1, po, device=dev, dtype=dt)

    def add_norm(parts, h, w):  # what inductor fuses after a producer's partials today
        s = h + parts.sum(0).to(h.dtype)
        sf = s.float()
        return s, w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS)).to(s.dtype)

    fused_add_norm = add_norm
    if dev == "cuda":
        import torch._inductor.config as inductor_config

        from rsparse.decode import gpu_inductor
        with inductor_config.patch(gpu_inductor()):
            fused_add_norm = torch.compile(add_norm, dynamic=False)
            fused_add_norm(ppart, resid, g)

    def today(i):
        tg._gather(px, pw[i], pc, ptau, ppart, pcfg, po, po)
        _, x = fused_add_norm(ppart, resid, g)
        return tg._gather(x, cw[i], cc, ctau, cpart, ccfg, co, co)

    def fused(i):
        # the residual enters as the split kernel's bias: one (OUT,) load per tile, as the add would at batch 1
        launch_splitk(px, pw[i], pc, ptau, resid[0], scfg, hbuf, po, po, False, locks)
        return normed_gather(hbuf, g, cw[i], cc, ctau, ccfg, xn, cpart)

    # checks against the float64 oracle: the consumer's output, both chains
    ref = gemv_ref(rms_ref(h_true, g), cw[0], ctau)
    errs = {}
    for name, chain in (("today", today), ("fused", fused)):
        cpart.fill_(float("nan"))
        y = chain(0).sum(0)
        errs[name] = ((y.double() - ref).norm() / ref.norm()).item()
        if not errs[name] < 2e-2:
            sys.exit(f"{name} chain wrong at {prod} -> {cons}: relative error {errs[name]:.3g}")
    row = {"producer": f"{po}x{pi}", "consumer": f"{co}x{ci}", "rel_err_today": errs["today"], "rel_err_fused": errs["fused"]}
    if not timed:
        return row
    from triton.testing import do_bench_cudagraph

    def us(fn):
        return do_bench_cudagraph(lambda: [fn(i) for i in range(COPIES)], rep=300, return_mode="median") / COPIES * 1e3

    row.update(today_us=us(today), fused_us=us(fused),
               producer_gather_us=us(lambda i: tg._gather(px, pw[i], pc, ptau, ppart, pcfg, po, po)),
               producer_split_us=us(lambda i: launch_splitk(px, pw[i], pc, ptau, resid[0], scfg, hbuf, po, po, False, locks)),
               add_norm_us=us(lambda i: fused_add_norm(ppart, resid, g)),
               consumer_gather_us=us(lambda i: tg._gather(xn, cw[i], cc, ctau, cpart, ccfg, co, co)),
               consumer_normed_us=us(lambda i: normed_gather(hbuf, g, cw[i], cc, ctau, ccfg, xn, cpart)))
    row["saved_us"] = row["today_us"] - row["fused_us"]
    return row


def main():
    from gpu_kernels import finish  # benchmarks/ on PYTHONPATH, as for the other GPU scripts

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run with TRITON_INTERPRET=1 for the correctness check on small shapes")
    torch.manual_seed(0)
    dt = torch.bfloat16 if dev == "cuda" else torch.float16  # the interpreter computes bf16 wrongly (as the tests note)
    if dev == "cuda":
        sites = [((4096, 4096), (28672, 4096)), ((4096, 14336), (6144, 4096))]
    else:  # odd widths, several chunks and tiles
        sites = [((136, 200), (264, 136)), ((200, 520), (96, 200))]
    shapes = {s for pair in sites for s in pair}
    cfgs = {s: tg.config_for(s[0], 0, s[1], reduce=False) for s in shapes}
    if dev == "cpu":
        cfgs = {s: dict(c, chunk=64, block_n=32, block_k=16) for s, c in cfgs.items()}
    rows = []
    for prod, cons in sites:
        row = site(prod, cons, dev, dt, cfgs, timed=dev == "cuda")
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if dev == "cuda":
        print(f"\n{'site':>26s} {'today':>8s} {'fused':>8s} {'saved':>7s} | {'gather':>7s} {'split':>7s} {'add+norm':>8s} "
              f"{'gather':>7s} {'normed':>7s}  (µs per site)")
        for r in rows:
            print(f"{r['producer'] + ' -> ' + r['consumer']:>26s} {r['today_us']:8.2f} {r['fused_us']:8.2f} {r['saved_us']:7.2f} | "
                  f"{r['producer_gather_us']:7.2f} {r['producer_split_us']:7.2f} {r['add_norm_us']:8.2f} "
                  f"{r['consumer_gather_us']:7.2f} {r['consumer_normed_us']:7.2f}")
    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter, no timing)",
              "configs": {f"{o}x{i}": c for (o, i), c in cfgs.items()}, "rows": rows}
    if dev == "cuda":
        # per step: each site occurs once per layer (32 layers)
        result["saved_per_step_us"] = 32 * sum(r["saved_us"] for r in rows)
    finish("gpu_norm_prologue.json", result)


if __name__ == "__main__":
    main()
