"""Does the compiled decode step compute what the eager step computes, at every batch?

Session 17's sweep (`gpu_decode_s17_sweep.log`) compared each compiled step with the eager step over
the same modules, on the 32-layer random-weight Llama-3-8B model: 4-6e-2 relative error for dense and
sparse at batch 1 and for dense at batch 2, but 1.13 for the sparse (fused) step at batch 2. Either
the compiled batch-2 sparse step is wrong, or the random 32-layer model amplifies small differences
(flipped kept channels near the threshold) into large ones. Here the same comparison on models of
fewer layers (amplification grows with depth; a wrong step is wrong from the first layer), per row,
at batches 1 and 2, for the compiled step under inductor's defaults and under
`decode.GPU_INDUCTOR`, and with our epilogue summing the partials instead of inductor
(`consumer_reduce="none"`). Prints a table, ends with one JSON line; writes
$OUT/gpu_compiled_check.json.
`PYTHONPATH=src python3 benchmarks/gpu_compiled_check.py [--layers 2,8] [--batches 1,2]`
"""
import argparse
import json
import os

import torch

from rsparse import gpubench as gb
from rsparse import gpumodel as gm
from rsparse.apply import swapped
from rsparse.atomic import write_json
from rsparse.decode import GPU_INDUCTOR, GraphDecoder, fresh_step
from rsparse.families import locate
from rsparse.gpuvariants import compile_options, uncached_compiles
from rsparse.kernels.module import triton_groups


def row_errors(got, ref):
    """Relative error of each row (batch entry) of the step's logits."""
    g, r = got.float().reshape(got.shape[0], -1), ref.float().reshape(ref.shape[0], -1)
    return [((g[i] - r[i]).norm() / r[i].norm()).item() for i in range(r.shape[0])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    uncached_compiles()
    torch._dynamo.config.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    variants = [("dense", False, {}), ("fused", True, {}), ("fused-tuned", True, {"inductor": GPU_INDUCTOR}),
                ("fused-tuned-epilogue", True, {"inductor": GPU_INDUCTOR, "consumer_reduce": "none"})]
    rows, path = [], os.path.join(os.environ.get("OUT", "."), "gpu_compiled_check.json")
    for layers in map(int, args.layers.split(",")):
        key = f"llama3-8b-{layers}l"
        gm.MODELS[key] = dict(gm.MODELS["llama3-8b"], num_hidden_layers=layers)
        torch.manual_seed(0)
        model = gm.build(key)
        projs = locate(model)
        sparse, _ = gm.modules_at(projs, args.sparsity, 1.0, decide_rows=False)
        groups = triton_groups(model, sparse)
        samples = gm.sparse_samples(model, sparse, {}, args.sparsity)  # sets the thresholds
        for B in map(int, args.batches.split(",")):
            dec = GraphDecoder(model, max_len=gb.MAX_LEN, batch=B, attention="triton")
            g_dense, out_dense = gb.capture(dec.step, B)
            with swapped(model, sparse), gm.attached(model, groups):
                g_fused, out_fused = gb.capture(dec.step, B)
            g_fused.replay()
            g_dense.replay()
            row = {"layers": layers, "batch": B, "eager_fused_vs_dense": row_errors(out_fused, out_dense)}
            for label, is_sparse, opts in variants:
                mods, grp = (sparse, groups) if is_sparse else ({}, {})
                with swapped(model, mods), gm.attached(model, grp), compile_options(dec, **opts):
                    torch._dynamo.reset()
                    g, out = gb.capture(torch.compile(fresh_step(dec)), B)
                g.replay()
                ref_g, ref = (g_fused, out_fused) if is_sparse else (g_dense, out_dense)
                ref_g.replay()
                row[label] = row_errors(out, ref)
                del g
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(path, {"rows": rows, "sparsity": args.sparsity})  # kept if a time limit stops the run
            del dec, g_dense, g_fused
        del model, sparse, groups, samples
        torch.cuda.empty_cache()
    cols = ["eager_fused_vs_dense"] + [v[0] for v in variants]
    print(f"\nrelative error per row against the eager step over the same modules (max over rows)\n"
          f"{'layers':>6s} {'B':>2s} " + " ".join(f"{c:>22s}" for c in cols))
    for r in rows:
        print(f"{r['layers']:6d} {r['batch']:2d} " + " ".join(f"{max(r[c]):22.2e}" for c in cols))
    print(json.dumps({"max_rel_err": {c: max(max(r[c]) for r in rows) for c in cols}}))


if __name__ == "__main__":
    main()
