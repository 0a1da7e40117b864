"""Helper run in a subprocess by test_kernels.py (Triton's interpreter off): every decode kernel traced
the way torch.compile analyses a user-defined Triton kernel, for an sm_90 target, without a GPU.

1. Compiled with every scalar argument a constant, as torch 2.11's mutation analysis traces kernels: a
   kernel that only compiles with runtime scalars (e.g. `(0 >= HALF).to(...)`, a Python bool there)
   makes inductor assume every input mutated and copy all of them on every call.
2. Compiled with the scalars as runtime arguments typed as inductor's generated launcher types them:
   an int i32, a float fp64 (session 13: the attention kernel's float `scale` made its softmax state
   fp64 inside the loop, which compiled under Triton's JIT and interpreter (fp32) and failed under
   torch.compile on the H200).
3. torch's own analysis (`identify_mutated_tensors` / `identify_accessed_tensors`) on the same kernel.

Prints one JSON line: {kernel label: sorted pointer arguments torch finds written}.
"""
import json
import sys

import torch
import torch._higher_order_ops.triton_kernel_wrap as tkw
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rsparse.kernels import attention, lowrank, rmsnorm, splitk, teal, triton_gemv as tg

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {"ypart_ptr": torch.float32, "zpart_ptr": torch.float32, "tau_ptr": torch.float32, "scratch_ptr": torch.int32,
           "idx_ptr": torch.int32, "cnt_ptr": torch.int32, "lock_ptr": torch.int32, "sync_ptr": torch.int32, "y_ptr": torch.bfloat16,
           "pos_ptr": torch.int64, "part_ptr": torch.float32}
SCALARS = dict(B=1, IN=512, OUT=256, LDW=256, LDA=32, R=32, RT=32, SEG1=128, SEG2=256, ROFF1=16, ROFF2=32, HALF=128,
               K_PER=256, NCHUNK=2, NZCHUNK=2, NTILE=4, NZ=2, NW=4,
               HKV=2, sqb=256, sqh=64, skb=4096, skh=2048, skl=64, svb=4096, svh=2048, svl=64, sob=256, soh=64,
               kno=256, sknb=384, sknh=64, vno=320, svnb=384, svnh=64, scb=0,
               N=4000, shr=4096, sdr=4096, ssr=4096, syr=4096, WINDOW=4096)
EPI = dict(BB=16, BLOCK_N=64, RB=32, HAS_BIAS=True, NCP=2, NZP=2)
KERNELS = {  # label: (kernel, constexprs)
    "select": (tg._select, dict(CHUNK=256, BB=16, RB=32, HAS_R=True)),
    "group_z": (lowrank._group_z, dict(CHUNK=256, BB=16, RB=32)),
    "gather": (tg._gather_gemv, dict(CHUNK=256, BB=16, BLOCK_K=32, BLOCK_N=64)),
    "fused_gather": (tg._fused_gather_gemv, dict(CHUNK=256, BB=16, BLOCK_K=32, BLOCK_N=64)),
    "ranked_gather": (lowrank._ranked_gather_gemv, dict(CHUNK=256, BB=16, BLOCK_K=32, BLOCK_N=64, Z_HERE=True, ZCHUNK=256, RB=32, NZP=2,
                                                        KEPT=True)),
    "splitk": (splitk._splitk_gemv, dict(CHUNK=256, BB=16, BLOCK_K=32, BLOCK_N=64, SPLITS=2, GLU=True, HAS_BIAS=True)),
    "epilogue": (tg._epilogue, dict(EPI, HAS_R=True)),
    "glu_epilogue": (tg._glu_epilogue, dict(EPI, HAS_R=True)),
    "teal": (teal._teal_kernel, dict(BLOCK_K=32, BLOCK_N=64)),
    "attention": (attention._decode_attention, dict(G=4, GP=16, D=64, BLOCK_L=64, SPLITS=2, SCALE=0.125, ROPE=False, SOFTCAP=0.0)),
    "attention_rope": (attention._decode_attention, dict(G=4, GP=16, D=64, BLOCK_L=64, SPLITS=2, SCALE=0.125, ROPE=True, SOFTCAP=50.0)),
    "add_rms_norm": (rmsnorm._add_rms_norm, dict(EPS=1e-5, HAS_D=True, BLOCK=4096)),
}


class _Sm90:
    def get_current_target(self):
        return TARGET


def _kwargs(fn, consts):
    out = {}
    for name in fn.arg_names:
        if name in consts:
            out[name] = consts[name]
        elif name.endswith("_ptr"):
            out[name] = torch.empty(64, dtype=POINTER.get(name, torch.bfloat16))
        else:
            out[name] = SCALARS[name]
    return out


def main():
    triton.runtime.driver.set_active(_Sm90())
    analyse = getattr(tkw, "identify_mutated_tensors", None) or tkw.identify_accessed_tensors
    written = {}
    for label, (fn, consts) in KERNELS.items():
        kw = _kwargs(fn, consts)
        scalars = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
        sig = {k: "constexpr" if k in scalars else "*" + {torch.float32: "fp32", torch.int32: "i32"}.get(v.dtype, "bf16")
               for k, v in kw.items()}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=scalars), target=TARGET, options=dict(num_warps=4))
        runtime = {k: ("fp64" if isinstance(kw[k], float) else "i32") if k in scalars and k not in consts else t
                   for k, t in sig.items()}
        triton.compile(ASTSource(fn=fn, signature=runtime, constexprs=consts), target=TARGET, options=dict(num_warps=4))
        res = analyse(fn, kw, {})
        names = res if isinstance(res, list) else [d.name for d in res.read_writes.writes]
        written[label] = sorted(names)
    print(json.dumps(written))


if __name__ == "__main__":
    sys.exit(main())
