"""Does the gather's tail come from how its grid falls on the SMs? The configured r = 0 gather
(`triton_gemv._gather`, what compiled steps run) timed alone, 50%, batch 1, bf16, with the launch
configuration of a Llama-3-8B call held fixed while the layer's width changes, so only the number of
programs (and the bytes, in proportion) moves:
- "gate|up": in 4096, out 256 T (chunk 2048, tile 256: 2 T programs), the 28672x4096 configuration;
- "down": in 14336, out 128 T (chunk 2048, tile 128: 7 T programs), the 4096x14336 configuration.
Every grid fits on the SMs at once (session 16), so a program's SM shares its bandwidth with at most
ceil(P / SMs) - 1 others. If a program streams at a rate of its own (latency-bound), the call lasts
as long as the most loaded SM: time jumps where P passes a multiple of the SM count (P = 133 puts two
programs on one SM) and a grid of exactly k SMs is the best per byte. If the DRAM is the limit, time
grows with the bytes alone. Session 16's timeline saw programs of equal work end up to 6 us apart.
The narrowed programs this suggested (a tile or channel count below the power-of-2 block, to bring
the grid nearer 2 programs on every SM) were timed with `--shaped` at commit 028e35b and lost on both
MLP calls (gpu_grid_shaped_s20.json, docs/perf-gpu.md session 20); that mode went with them.
Each width is checked against the float32 oracle (the sum of its partials) first; timed like
`gpu_kernels.py` (weight copies in one CUDA graph, so weights come from HBM).
Prints a table, ends with one JSON line, writes $OUT/gpu_grid_balance.json.
`PYTHONPATH=src:benchmarks python3 benchmarks/gpu_grid_balance.py`
"""
import torch
import triton

from gpu_kernels import device_bandwidth, finish, oracle_case50, time_grid
from rsparse.kernels import triton_gemv as tg

FAMILIES = {  # name: (configured shape (out, in), in, tile width, the T values: out = tile * T)
    "gate|up": ((28672, 4096), 4096, 256, (60, 64, 66, 67, 70, 80, 96, 104, 112, 120, 128, 132, 133, 136, 144)),
    "down": ((4096, 14336), 14336, 128, (16, 18, 19, 20, 24, 28, 32, 36, 37, 38)),
}


def main():
    torch.manual_seed(0)
    bw = device_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{sms} SMs", flush=True)
    rows = []
    for name, ((cout, cin), in_f, tile, ts) in FAMILIES.items():
        cfg = tg.config_for(cout, 0, cin, reduce=False)
        assert cfg["block_n"] == tile, (name, cfg)
        nchunk = triton.cdiv(in_f, cfg["chunk"])
        for t in ts:
            out_f = tile * t
            Wts, x, ones, tau, ref, floor_us = oracle_case50(out_f, in_f, bw)
            parts = torch.empty(nchunk, 1, out_f, device="cuda")
            times = time_grid([cfg], lambda c, Wt: tg._gather(x, Wt, ones, tau, parts, c, out_f, out_f), ref, Wts,
                              rep=100, tag=f"{out_f}x{in_f}", result=lambda p: p.sum(0))
            progs = t * nchunk
            us = times.get(0)
            row = {"family": name, "shape": f"{out_f}x{in_f}", "programs": progs, "max_per_sm": -(-progs // sms),
                   "floor_us": floor_us, "us": us, "bw_frac": floor_us / us if us else None}
            rows.append(row)
            print(f"{name:>8} {row['shape']:>11}  programs {progs:4d} (max {row['max_per_sm']}/SM)  floor {floor_us:6.2f} us  "
                  f"gather {us if us else float('nan'):6.2f} us  {100 * row['bw_frac'] if us else float('nan'):5.1f}% of copy",
                  flush=True)
            del Wts
    configs = {n: tg.config_for(f[0][0], 0, f[0][1], reduce=False) for n, f in FAMILIES.items()}
    finish("gpu_grid_balance.json", {"copy_bw_TBps": bw / 1e12, "sms": sms, "configs": configs, "rows": rows})


if __name__ == "__main__":
    main()
