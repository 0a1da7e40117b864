"""Decode attention alone: the graphed step's SDPA (every cache slot under the slot mask, the mask built
once as the step builds it once per step for all layers) against `rsparse::decode_attention` (only the
filled slots) over its launch grid, Llama-3-8B heads (32 query, 8 KV, head dim 128), a 512-slot cache,
batch 1 and 4, at 64, 257 and 512 filled slots. Each layer's cache is its own copy (32, as the step
reads 32 layers' caches once each, so L2 holds no more of it than in the step). Every candidate is
checked against float32 SDPA first. Prints a table, ends with one JSON line; writes
$OUT/gpu_attention.json.   `PYTHONPATH=src python3 benchmarks/gpu_attention.py`

Session 13's end-to-end profile had the kernel at 8.1 µs per layer (16 splits of 64-slot steps, merge
over all splits) against SDPA's ~9.2, for ~1 MB that needs ~0.25 µs at copy bandwidth: a latency
chain (pos -> bounds -> K, V -> partials -> ticket -> merge), not bytes. This script's first run
(`gpu_attention_s13.json`; the merge over the used splits only, SDPA then with its mask built per
call: 17.3-17.7 µs): the kernel 3.0 (64 filled, 1 split) to 7.6 µs (512 filled, 4 splits) at batch 1;
more than one split cost ~2 µs over one at 64 filled slots (partials, ticket, merge, the tickets'
zero fill), so one used split now writes o itself.
"""
import json
import statistics

import torch

from gpu_kernels import _print_row, _write, bench, time_grid
from rsparse.attend import _slot_mask, attention, attention_splits, masked_attention
from rsparse.kernels.attention import decode_attention

H, HKV, D, SLOTS, LAYERS = 32, 8, 128, 512, 32
GRID = [(s, bl) for s in (1, 2, 4, 8, 16, 32) for bl in (32, 64, 128)]  # s13: 64 beat 16 and 32 everywhere


def main():
    torch.manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for batch in (1, 4):
        q = torch.randn(batch, 1, H, D, device="cuda").transpose(1, 2).to(torch.bfloat16)
        caches = [(torch.randn(batch, HKV, SLOTS, D, device="cuda").to(torch.bfloat16),
                   torch.randn(batch, HKV, SLOTS, D, device="cuda").to(torch.bfloat16)) for _ in range(LAYERS)]
        for n in (64, 257, 512):
            pos = torch.tensor([n - 1], device="cuda")
            ref = masked_attention(q.float(), caches[0][0].float(), caches[0][1].float(), pos)
            mask = _slot_mask(SLOTS, pos)
            row = dict(batch=batch, filled=n, sdpa_us=bench(lambda: [attention(q, k, v, mask) for k, v in caches], rep=200, copies=LAYERS))
            # GRID's (splits, slots per step), each checked against ref on the first cache, then timed over all
            times = {GRID[i]: us for i, us in time_grid(GRID, lambda cfg, kv: decode_attention(q, *kv, pos, *cfg), ref, caches,
                                                        rep=200, tag=f"B={batch} filled={n}").items()}
            best = min(times, key=times.get)
            row.update(default_us=times.get((attention_splits(batch, HKV), 64)), best_us=times[best], best_splits=best[0],
                       best_block_l=best[1], grid={f"{s}x{b}": t for (s, b), t in times.items()})
            rows.append(row)
            _print_row(row, skip=("grid",))
    print("\n  B  filled  SDPA us  default us  best us  (splits, slots/step)  SDPA / best")
    for r in rows:
        print(f"{r['batch']:3d} {r['filled']:7d} {r['sdpa_us']:8.2f} {r['default_us'] or float('nan'):11.2f} "
              f"{r['best_us']:8.2f}  ({r['best_splits']:2d}, {r['best_block_l']:2d}){'':14s}{r['sdpa_us'] / r['best_us']:6.2f}")
    result = dict(rows=rows, median_sdpa_over_best=statistics.median(r["sdpa_us"] / r["best_us"] for r in rows))
    _write("gpu_attention.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
