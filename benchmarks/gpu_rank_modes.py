"""The ways of computing rank terms (`triton_gemv.RANK_MODES` that run in the gather launch), per call
of a Llama-3-8B block as compiled steps make them, side by side: q|k|v and o and down through
`rsparse_partials` (the partials inductor sums), gate|up through `rsparse_glu_gemv` (gather + SiLU·up
epilogue). Ranks from the budget at --alpha (default 0.9, 50%; the modules' multiples of 16), and the
same calls at r = 0 with the same kept fractions: what the rank terms cost on top of the gather.

`--zchunks N,..` also times one-launch with N channels per z program on every call (the default takes
`lowrank.z_chunk`: 512 on the MLP's calls, 128 on the others). `--knobs K=V[,K=V]` (repeatable) also
times one-launch under each setting of `lowrank.knobs()` (e.g. `--knobs ZCHUNK_WIDE=256 --knobs
ZCHUNK_WIDE=0`; session 22 timed knobs since removed, spelled then as one ';'-separated string:
`gpu_rank_knobs_s22.json`, code at 14e5bff).

Every mode is first checked against the float32 oracle (relative error < 1e-2); weights cycle through 4
copies inside one CUDA graph (`gpu_kernels.bench`), so they come from HBM. The calls are eager: the
partials' sum is a chain of adds (a kernel per partial row after the first) that inductor fuses into
one kernel in a compiled step, so a mode that writes more partial rows pays for launches here that
it would not pay there. Prints a table, ends with one JSON line; writes $OUT/gpu_rank_modes.json.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_rank_modes.py [--alpha 0.9] [--sparsity 0.5] [--modes M,..]
        [--zchunks N,..] [--knobs K=V[,K=V] ...] [--launch K=V[,K=V] ...]

`--launch K=V[,K=V]` (repeatable) also times one-launch, and r = 0 beside it, with every call's launch
configuration changed so (`triton_gemv._group_cfg`'s keys: chunk, block_n, block_k, warps, stages;
e.g. `--launch stages=2`, session 28: the ranked down kernel keeps 2 tile buffers where the r = 0
gather keeps 1; `--launch chunk=1024`: gate|up's rank blocks over 4 chunks instead of 2).
"""
import argparse
import sys

import torch

from gpu_kernels import COPIES, bench, device_bandwidth, finish
from rsparse.errors import RSparseError
from rsparse.budget import allocate
from rsparse.kernels.module import RANK_ALIGN
from rsparse.gpuvariants import rank_patches
from rsparse.kernels import lowrank, triton_gemv as tg
from rsparse.linear import rsparse_linear_ref

MODES = ("one-launch", "gather")
# (name, member widths, in): the calls of one Llama-3-8B block
CALLS = [("q|k|v", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("gate|up", (14336, 14336), 4096),
         ("down", (4096,), 14336)]


def build(outs, in_f, sparsity, alpha, dt):
    """COPIES sets of members side by side (wt, at, u packed as the groups store them), one Laplace row
    x, per-member scales (ones) and thresholds for the allocation's kept fraction; the float32 oracle
    per member on copy 0."""
    als = [allocate(o, in_f, sparsity, alpha, RANK_ALIGN) for o in outs]
    ranks = [a.rank for a in als]
    x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
    taus = torch.stack([torch.quantile(x[0].float().abs(), 1 - a.keep) for a in als])
    cs = torch.ones(len(outs), in_f, device="cuda", dtype=dt)
    copies = []
    for _ in range(COPIES):
        Ws = [(torch.randn(o, in_f, device="cuda") / in_f**0.5).to(dt) for o in outs]
        Us = [(torch.randn(o, r, device="cuda") / 8).to(dt) for o, r in zip(outs, ranks)]
        As = [(torch.randn(r, in_f, device="cuda") / in_f**0.5).to(dt) for r in ranks]
        copies.append((torch.cat([W.t() for W in Ws], 1).contiguous(), torch.cat([A.t() for A in As], 1).contiguous(),
                       torch.cat([U.reshape(-1) for U in Us]), Ws, Us, As))
    _, _, _, Ws, Us, As = copies[0]
    refs = [rsparse_linear_ref(x.float(), W.float(), None, taus[i], cs[i].float(), U.float(), A.float())
            for i, (W, U, A) in enumerate(zip(Ws, Us, As))]
    return x, cs, taus, copies, refs, ranks


def bounds(v):
    return ([sum(v[:i + 1]) for i in range(len(v))] + [sum(v)] * 2)[:2]


_LOCKS = {}  # tile counters per width, made once (as a module's): none allocated inside a timed call


def call(name, x, wt, at, u, cs, taus, seg, roff, mode):
    """The call as a compiled step makes it, returning the layer's output (float32 for the partials)."""
    if wt.shape[1] not in _LOCKS:
        _LOCKS[wt.shape[1]] = tg.tile_locks(wt.shape[1], x.device)
    locks = _LOCKS[wt.shape[1]]
    if name == "gate|up":
        return tg.rsparse_glu_gemv(x, wt, at, u, cs, taus, locks, roff[0], None, mode)
    c, t = (cs, taus) if len(cs) > 1 else (cs[0], taus[0])
    return tg.sum_partials(tg.rsparse_partials(x, wt, at, u, c, t, locks, *seg, *roff, mode), None, torch.float32)


LAUNCH_KEYS = ("chunk", "block_n", "block_k", "warps", "stages")


def parse_launch(spec: str) -> dict:
    """'chunk=1024,stages=2' -> {"chunk": 1024, "stages": 2}; ValueError naming a bad key or value."""
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in LAUNCH_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{item!r}: expected KEY=positive integer, KEY one of {', '.join(LAUNCH_KEYS)}")
        out[key] = int(value)
    return out


def launch_changed(group_cfg, change: dict):
    """`triton_gemv._group_cfg` with `change` laid over every configuration it returns."""
    return lambda *a, **k: dict(group_cfg(*a, **k), **change)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of rank modes to time")
    ap.add_argument("--zchunks", default=None,
                    help="comma list: also time one-launch with these channels per z program (RANKED_TILES['ZCHUNK'])")
    ap.add_argument("--knobs", dest="rank_ab", action="append", metavar="KEY=VALUE[,...]",
                    help="also time one-launch with these lowrank.knobs() (repeatable; checked as rsparse bench --rank-ab)")
    ap.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE[,...]",
                    help="also time one-launch and r = 0 with every call's launch configuration changed so (repeatable)")
    args = ap.parse_args()
    modes = tuple(args.modes.split(","))
    try:
        launches = [(spec.replace(",", ";"), parse_launch(spec)) for spec in args.launch]
    except ValueError as e:
        sys.exit(f"--launch: {e}")
    zchunks = [int(z) for z in args.zchunks.split(",")] if args.zchunks else []
    try:
        knobs = rank_patches(args)  # [(label, {knob: value})]
    except RSparseError as e:
        sys.exit(str(e))
    torch.manual_seed(0)
    dt = torch.bfloat16
    bw = device_bandwidth()
    rows = []
    for name, outs, in_f in CALLS:
        x, cs, taus, copies, refs, ranks = build(outs, in_f, args.sparsity, args.alpha, dt)
        seg, roff = bounds(list(outs)), bounds(ranks)
        ref = torch.nn.functional.silu(refs[0]) * refs[1] if name == "gate|up" else torch.cat(refs, 1)
        row = {"call": name, "outs": outs, "in": in_f, "ranks": ranks}
        default_z = lowrank.RANKED_TILES["ZCHUNK"]
        variants = ([(m, m, default_z, {}, None) for m in modes] + [(f"z{z}", "one-launch", z, {}, None) for z in zchunks]
                    + [(lb, "one-launch", default_z, ks, None) for lb, ks in knobs]
                    + [(lb, "one-launch", default_z, {}, lc) for lb, lc in launches])
        group_cfg = tg._group_cfg
        for label, mode, zc, ks, lc in variants:
            lowrank.RANKED_TILES["ZCHUNK"] = zc  # read at launch: z programs = members x in / ZCHUNK
            saved = lowrank.set_knobs(ks)
            if lc:  # the ops look their configuration up through _group_cfg at every call
                tg._group_cfg = launch_changed(group_cfg, lc)
            wide, lowrank.ZCHUNK_WIDE = lowrank.ZCHUNK_WIDE, (lowrank.ZCHUNK_WIDE if label != f"z{zc}" else None)  # zN: every call
            try:
                y = call(name, x, *copies[0][:3], cs, taus, seg, roff, mode)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert torch.isfinite(y).all() and err < 1e-2, (name, label, err)
                row[f"{label}_err"] = err
                row[f"{label}_us"] = bench(lambda: [call(name, x, wt, at, u, cs, taus, seg, roff, mode) for wt, at, u, *_ in copies])
            finally:
                lowrank.RANKED_TILES["ZCHUNK"], lowrank.ZCHUNK_WIDE = default_z, wide
                lowrank.set_knobs(saved)
                tg._group_cfg = group_cfg
        # r = 0 at the same kept fractions: the gather the rank terms ride on
        empty = [(wt, torch.empty(in_f, 0, device="cuda", dtype=dt), torch.empty(0, device="cuda", dtype=dt)) for wt, *_ in copies]
        zero = bounds([0] * len(outs))
        def r0_calls():
            return [call(name, x, wt, at, u, cs, taus, seg, zero, "one-launch") for wt, at, u in empty]
        row["r0_us"] = bench(r0_calls)
        for label, lc in launches:  # the r = 0 gather under the same launch change
            tg._group_cfg = launch_changed(group_cfg, lc)
            try:
                row[f"r0 {label}_us"] = bench(r0_calls)
            finally:
                tg._group_cfg = group_cfg
        kept = sum(o * (x[0].float().abs() > t).float().mean().item() for o, t in zip(outs, taus)) * in_f * 2
        rank_b = sum(2 * r * (o + in_f) for o, r in zip(outs, ranks))
        row["bytes"] = kept + rank_b
        labels = list(modes) + [f"z{z}" for z in zchunks] + [lb for lb, _ in knobs] + [lb for lb, _ in launches]
        for label in labels:
            row[f"{label}_bw_frac"] = row["bytes"] / (row[f"{label}_us"] * 1e-6) / bw
        rows.append(row)
        print(row, flush=True)
    print(f"\nalpha {args.alpha}, sparsity {args.sparsity}, batch 1, bf16, µs per call (BW: kept rows + both factors at copy bandwidth;"
          " zN: one-launch with N channels per z program)")
    print(f"{'call':8s} {'ranks':>14s} {'r = 0':>7s}" + "".join(f" {m:>11s}" for m in labels) + "".join(f" {'BW ' + m:>14s}" for m in labels))
    for r in rows:
        print(f"{r['call']:8s} {str(r['ranks']):>14s} {r['r0_us']:7.2f}" + "".join(f" {r[m + '_us']:11.2f}" for m in labels)
              + "".join(f" {r[m + '_bw_frac']:14.1%}" for m in labels))
    for label, _ in launches:
        print(f"r = 0 with {label}: " + ", ".join(f"{r['call']} {r[f'r0 {label}_us']:.2f}" for r in rows))
    block = {m: sum(r[f"{m}_us"] for r in rows) for m in labels + ["r0"] + [f"r0 {lb}" for lb, _ in launches]}
    print("one block's four calls, µs: " + ", ".join(f"{m} {v:.2f}" for m, v in block.items()))
    finish("gpu_rank_modes.json", {"copy_bw_TBps": bw / 1e12, "alpha": args.alpha, "sparsity": args.sparsity,
                                   "block_us": block, "rows": rows})


if __name__ == "__main__":
    main()
