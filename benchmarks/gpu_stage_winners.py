"""Session 13's deeper-pipeline winners, with rank terms too, before any TUNED entry.

`gpu_gather_grid.py --stages` (session 13, r = 0, the gather alone) found 5-7 software-pipeline stages
faster than the rule's configuration on four small shapes: 4096x4096 (+4%), 5120x3072 (Llama-3.2-3B
q|k|v, +13%), 16384x2048 (1B gate|up, +9%), 2048x8192 (1B down, +11%). A TUNED entry also serves
calls with rank terms (`_ranked_gather`, the compiled step's path with alpha < 1), never timed at those
stages. Here each shape's rule configuration and its winner, side by side, as the compiled step runs
them: r = 0 (`_gather`) and with the rank the budget gives at alpha 0.9 (`_ranked_gather`, one-launch
and gather modes), 50%, batch 1, bf16, over 4 weight copies; each call checked against the float32
oracle first. A winner goes into TUNED only if it is faster in every column. Prints a table, ends
with one JSON line; writes $OUT/gpu_stage_winners.json.
`PYTHONPATH=src python3 benchmarks/gpu_stage_winners.py`
"""
import json

import torch

from gpu_kernels import COPIES, _write, time_grid
from rsparse.budget import allocate
from rsparse.kernels.module import RANK_ALIGN
from rsparse.kernels import triton_gemv as tg
from rsparse.kernels.lowrank import _ranked_gather
from rsparse.linear import rsparse_linear_ref

WINNERS = {(4096, 4096): dict(chunk=1024, block_k=128, block_n=128, warps=4, stages=7, fused=True),
           (5120, 3072): dict(chunk=1024, block_k=128, block_n=128, warps=4, stages=7, fused=True),
           (16384, 2048): dict(chunk=2048, block_k=128, block_n=128, warps=4, stages=5, fused=True),
           (2048, 8192): dict(chunk=1024, block_k=128, block_n=128, warps=4, stages=7, fused=True)}


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []
    for (out_f, in_f), win in WINNERS.items():
        rule = tg.config_for(out_f, 0, in_f, reduce=False)
        cands = [rule, win]
        x = torch.distributions.Laplace(0.0, 1.0).sample((1, in_f)).to("cuda", dt)
        ones = torch.ones(in_f, device="cuda", dtype=dt)
        Wts = [(torch.randn(in_f, out_f, device="cuda") / in_f**0.5).to(dt) for _ in range(COPIES)]
        row = {"out": out_f, "in": in_f, "rule": rule, "winner": win}
        for label, alpha in (("r0", 1.0), ("ranked", 0.9)):
            al = allocate(out_f, in_f, 0.5, alpha, RANK_ALIGN)
            R = al.rank if alpha < 1 else 0
            tau = torch.quantile(x.float().abs(), 1 - (al.keep if alpha < 1 else 0.5)).reshape(())
            at = (torch.randn(in_f, R, device="cuda") / 8).to(dt)
            u = (torch.randn(out_f, R, device="cuda") / 8).to(dt)
            ref = rsparse_linear_ref(x.float(), Wts[0].t().float(), None, tau, ones.float(), u.float(), at.t().float())
            modes = ("-",) if R == 0 else ("one-launch", "gather")
            for mode in modes:
                if R == 0:
                    def call(cfg, w):
                        ypart = torch.empty(-(-in_f // cfg["chunk"]), 1, out_f, device="cuda")
                        return tg._gather(x, w, ones, tau, ypart, cfg, out_f, out_f)
                else:
                    def call(cfg, w, mode=mode):
                        return _ranked_gather(x, w, at, u, ones, tau, cfg, out_f, out_f, R, R, mode)
                times = time_grid(cands, call, ref, Wts, rep=200, tag=f"{out_f}x{in_f} {label} {mode}",
                                  result=lambda y: y.sum(0))
                key = label if R == 0 else f"{label}_{mode}"
                row[f"{key}_rank"] = R
                row[f"{key}_rule_us"], row[f"{key}_winner_us"] = times.get(0), times.get(1)
                print(f"{out_f:>5}x{in_f:<5} {key:18s} r={R:<4d} rule {times.get(0, float('nan')):7.2f} us  "
                      f"winner {times.get(1, float('nan')):7.2f} us", flush=True)
        cols = [k[:-8] for k in row if k.endswith("_rule_us")]
        row["winner_faster_everywhere"] = all(row[f"{c}_winner_us"] is not None and row[f"{c}_rule_us"] is not None
                                              and row[f"{c}_winner_us"] < row[f"{c}_rule_us"] for c in cols)
        rows.append(row)
    summary = {f"{r['out']}x{r['in']}": r["winner_faster_everywhere"] for r in rows}
    _write("gpu_stage_winners.json", {"rows": rows, "winner_faster_everywhere": summary})
    print(json.dumps({"winner_faster_everywhere": summary}))


if __name__ == "__main__":
    main()
