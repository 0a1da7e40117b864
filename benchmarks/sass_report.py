"""What the decode kernels compile to on an H200 (sm_90), without a GPU: registers, spill stack,
shared memory and the width of global loads in the SASS, per kernel and launch configuration.

Triton compiles for a given target offline (its bundled ptxas and cuobjdump do the rest), so the
register pressure and load vectorisation of a kernel can be read on the CPU machine before device
time is spent. Each kernel is compiled twice, the way Triton's JIT specialises a real launch (batch
1; pointers 16-byte aligned; integer arguments divisible by 16 marked so): "aligned" with every
size divisible by 16, and "odd rank" with the rank strides and offsets not (At / U rows of an odd
rank such as 79, as before the modules padded ranks to RANK_ALIGN). Also counted: the instructions
and barriers before a program's first pipelined tile copy (the compaction prologue of the gather
kernels, a part of the fixed cost per call), and how many weight tiles the software pipeline keeps in
shared memory (`tile_buffers`, from the TTGIR): behind the gather's dependent index -> row loads,
num_stages 3-4 give one buffer (each K step waits for its own tile: no copy overlaps the next step's),
5-6 two, 7-8 three (Triton 3.6 and 3.9 alike; session 12).

    python3 benchmarks/sass_report.py      # table, then one JSON line; writes $OUT/sass_report.json
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rsparse.kernels import lowrank, splitk, triton_gemv as tg

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
RANK_INTS = {"LDA", "RT", "ROFF1", "ROFF2", "R"}
POINTER = {"ypart_ptr": "*fp32", "zpart_ptr": "*fp32", "tau_ptr": "*fp32", "scratch_ptr": "*i32", "idx_ptr": "*i32",
           "cnt_ptr": "*i32", "lock_ptr": "*i32", "sync_ptr": "*i32"}  # every other pointer: bf16 tensors
EPI = dict(BB=16, BLOCK_N=128, RB=64, HAS_BIAS=False, NCP=16)
KERNELS = [  # (kernel, constexprs, warps, stages)
    (tg._fused_gather_gemv, dict(CHUNK=2048, BB=16, BLOCK_K=128, BLOCK_N=128), 4, 3),  # the rule's, 14336x4096
    (tg._fused_gather_gemv, dict(CHUNK=2048, BB=16, BLOCK_K=128, BLOCK_N=128), 4, 5),  # double-buffered (13% slower, s13)
    (tg._fused_gather_gemv, dict(CHUNK=1024, BB=16, BLOCK_K=64, BLOCK_N=128), 4, 4),  # session 11's
    (splitk._splitk_gemv, dict(CHUNK=1024, BB=16, BLOCK_K=128, BLOCK_N=64, SPLITS=4, GLU=False, HAS_BIAS=False), 4, 4),
    (lowrank._group_z, dict(CHUNK=256, BB=16, RB=64), 4, 3),
    (lowrank._ranked_gather_gemv, dict(CHUNK=1024, BB=16, BLOCK_K=64, BLOCK_N=128, Z_HERE=True,
                                       **lowrank.RANKED_TILES), 4, 4),
    (lowrank._ranked_gather_gemv, dict(CHUNK=1024, BB=16, BLOCK_K=64, BLOCK_N=128, Z_HERE=False,
                                       **lowrank.RANKED_TILES), 4, 4),
    (tg._epilogue, dict(EPI, HAS_R=False, NZP=16), 4, 3),
    (tg._epilogue, dict(EPI, HAS_R=True, NZP=16), 4, 3),
    (tg._epilogue, dict(EPI, HAS_R=True, NZP=64), 4, 3),
    (tg._glu_epilogue, dict(EPI, HAS_R=True, NZP=16), 4, 3),
]


def compile_report(fn, consts: dict, warps: int, stages: int, odd_rank: bool) -> dict:
    names = fn.arg_names
    consts = dict(consts, B=1)  # decode batch 1: the JIT specialises an argument equal to 1
    sig = {n: "constexpr" if n in consts else POINTER.get(n, "*bf16") if n.endswith("_ptr") else "i32" for n in names}
    div16 = [(i,) for i, n in enumerate(names) if n not in consts and (sig[n].startswith("*") or not (odd_rank and n in RANK_INTS))]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs={k: [["tt.divisibility", 16]] for k in div16})
    k = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    usage = dict((m[0], int(m[1])) for m in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    code = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    # the latency a program pays before its first async (pipelined) tile copy: instructions, barriers
    first = next((i for i, ln in enumerate(code) if "LDGSTS" in ln), None)
    loads = Counter(re.findall(r"\b(LDG\.E[\w.]*|LDGSTS\.E[\w.]*)", sass))
    # shared-memory buffers of the 2-D (rows x columns) tiles the pipeline copies: the leading dimension
    tiles = [int(m) for m in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", k.asm["ttgir"])]
    return {"kernel": fn.__name__, "consts": {k: v for k, v in consts.items() if k != "B"}, "warps": warps, "stages": stages,
            "odd_rank": odd_rank, "registers": usage.get("REG"), "spill_stack_bytes": usage.get("STACK"),
            "shared_bytes": k.metadata.shared, "loads": dict(loads), "tile_buffers": max(tiles, default=None),
            "scalar_16bit_loads": sum(v for n, v in loads.items() if ".U16" in n), "instructions": len(code),
            "before_first_tile_copy": None if first is None else {"instructions": first,
                                                                  "barriers": sum("BAR" in ln for ln in code[:first])}}


def main():
    rows = []
    for fn, consts, warps, stages in KERNELS:
        rank_args = RANK_INTS & set(fn.arg_names)
        for odd in ((False, True) if rank_args else (False,)):
            rows.append(compile_report(fn, consts, warps, stages, odd))
            r = rows[-1]
            tag = ",".join(f"{k}={v}" for k, v in r["consts"].items() if k in ("HAS_R", "NZP", "CHUNK", "SPLITS", "BLOCK_K"))
            tag += f",st={stages}"
            print(f"{r['kernel']:20s} {tag:30s} {'odd rank' if odd else 'aligned':9s} regs {r['registers']:4d}  "
                  f"spill {r['spill_stack_bytes']:4d} B  shared {r['shared_bytes']:6d} B  scalar 16-bit loads "
                  f"{r['scalar_16bit_loads']:4d}  tile buffers {r['tile_buffers']}  before first tile copy {r['before_first_tile_copy']}",
                  flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "sass_report.json.tmp"), "w") as f:
            json.dump({"target": "sm_90", "triton": triton.__version__, "rows": rows}, f, indent=1)
        os.replace(os.path.join(out, "sass_report.json.tmp"), os.path.join(out, "sass_report.json"))
    spills = [f"{r['kernel']}{'/odd' if r['odd_rank'] else ''}" for r in rows if r["spill_stack_bytes"]]
    print(json.dumps({"triton": triton.__version__, "kernels": len(rows), "spilling": spills,
                      "aligned_scalar_16bit_loads": sum(r["scalar_16bit_loads"] for r in rows if not r["odd_rank"]),
                      "odd_rank_scalar_16bit_loads": sum(r["scalar_16bit_loads"] for r in rows if r["odd_rank"])}))


if __name__ == "__main__":
    sys.exit(main())
