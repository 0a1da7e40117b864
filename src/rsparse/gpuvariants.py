"""The A/B variants `rsparse bench --device cuda` compiles beside its dense and sparse steps, and the
switches they set while a step is traced (all are read at trace time and reach the graph: as
dynamo-level choices or as arguments of our ops). The harness compiles with inductor's FX graph
cache and AOTAutograd's cache off (`uncached_compiles`): one step compiled several ways must never
reuse another variant's code.
"""
import contextlib
import os
import shutil
import tempfile

from .decode import gpu_inductor
from .errors import RSparseError
from .kernels import triton_gemv as tg


def compiled_variants(args, label_c, sparse, groups, B):
    """(label, modules, groups, options) of the compiled steps. "dense" is the issue's baseline as
    named, cuBLAS matmuls under inductor's default settings; every other step is compiled under
    `decode.GPU_INDUCTOR` (coordinate-descent tuning and combo kernels), which at batch 1 gives the
    dense step inductor's own Triton GEMV: "dense-tuned", the faster dense (skipped with
    --no-tuned-dense), and the sparse step under the same settings. A/B variants asked for, each under
    GPU_INDUCTOR too: --compare-reduce (the partials summed by our epilogue kernel instead of by
    inductor in the consumer, and inductor summing them only where TUNED has no one-launch kernel);
    --inductor-ab (dense and sparse under GPU_INDUCTOR updated with other settings, e.g.
    combo_kernels=0); --masked-dense, batch > 1 (every projection as cuBLAS on its masked input
    instead of the gather kernels); --compare-rank MODES (the rank terms computed each listed way,
    `triton_gemv.RANK_TERMS`); --rank-ab (the sparse step with other rank-path knobs,
    `lowrank.knobs`); --compare-attention (dense and sparse with the other decode attention,
    `decode.GraphDecoder`); --compare-gather [CHUNKS] (the sparse step with the CUDA C++ gather,
    `kernels.module.GATHER`, once per listed count of 256-channel chunks per block, `cuda_gather.CHUNKS`);
    --retune N (the tuned dense, the sparse step and each CUDA-gather step compiled N times each, every
    repeat tuning afresh: `RETUNE`)."""
    chunks = gather_chunks(args)
    out = [("dense-tuned", {}, {}, {})] if getattr(args, "tuned_dense", True) else []
    out.append((label_c, sparse, groups, {}))
    if getattr(args, "compare_reduce", False) and B == 1:
        out.append((f"{label_c}-epilogue", sparse, groups, {"consumer_reduce": "none"}))
        out.append((f"{label_c}-non-splitk", sparse, groups, {"consumer_reduce": "non-splitk"}))
    for tag, patch in inductor_patches(args):
        out += [(f"dense-{tag}", {}, {}, {"inductor": patch}), (f"{label_c}-{tag}", sparse, groups, {"inductor": patch})]
    if getattr(args, "masked_dense", False) and B > 1:
        out.append((f"{label_c}-masked-dense", sparse, groups, {"kernel_rows": 0}))
    for mode in rank_modes(args):
        out.append((f"{label_c}-rank-{mode}", sparse, groups, {"rank_terms": mode}))
    for tag, values in rank_patches(args):
        out.append((f"{label_c}-{tag}", sparse, groups, {"rank_knobs": values}))
    for label, opts in (cuda_gather_step(label_c, k) for k in chunks):
        out.append((label, sparse, groups, opts))
    compare = getattr(args, "compare_attention", False)
    if compare:
        other = compare if isinstance(compare, str) else "fused" if getattr(args, "attention", "fused") == "sdpa" else "sdpa"
        out += [(f"dense-attn-{other}", {}, {}, {"attention": other}), (f"{label_c}-attn-{other}", sparse, groups, {"attention": other})]
    for i in range(2, getattr(args, "retune", 1) + 1):
        out += [(f"dense-tuned-{i}", {}, {}, RETUNE)] if getattr(args, "tuned_dense", True) else []
        out.append((f"{label_c}-{i}", sparse, groups, RETUNE))
        # the CUDA steps repeated too: an A/B of one compile each would compare tuning luck too
        for label, opts in (cuda_gather_step(label_c, k) for k in chunks):
            out.append((f"{label}-{i}", sparse, groups, {**RETUNE, **opts}))
    tuned = gpu_inductor()  # every step but "dense", an A/B's own settings on top
    return [("dense", {}, {}, {})] + [(label, mods, grp, {**opts, "inductor": {**tuned, **opts.get("inductor", {})}})
                                      for label, mods, grp, opts in out]


# A repeat compile that tunes afresh. Coordinate-descent tuning picks each kernel's configuration by
# timing candidates while the step first runs, and the pick varies: the tuned dense step ran 196.2,
# 211.3 and 232.0 tok/s in three runs (sessions 17-18) while cuBLAS dense stayed at 190.8-192.1. Within
# one process a second compile would reuse the first one's picks twice over: inductor's on-disk
# autotune cache, and its in-memory cache of loaded kernel modules, whose autotuners keep their pick
# (same kernel source, same module); both are bypassed here.
RETUNE = {"inductor": {"autotune_local_cache": False}, "fresh_kernels": True}


def skip_compile(label: str, label_c: str, elapsed: float, longest: float, limit: float) -> bool:
    """Whether to skip compiling an A/B step: it would end past the time limit if it took as long as the
    longest compile so far. The dense and the main sparse step are never skipped (every row needs them).
    A run killed while compiling loses every row (session 34: a fresh machine compiled 1.5-1.7x slower)."""
    return label not in ("dense", label_c) and elapsed + longest > limit


def gather_chunks(args) -> list:
    """--compare-gather's comma list of the CUDA gather's 256-channel chunks per block (`cuda_gather.CHUNKS`,
    1..64; the flag alone: 1); [] without the flag."""
    value = getattr(args, "compare_gather", None)
    if not value:
        return []
    if value is True:
        return [1]
    try:
        chunks = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        chunks = []
    if not chunks or any(not 1 <= k <= 64 for k in chunks):
        raise RSparseError(f"--compare-gather takes a comma list of 256-channel chunks per block, each 1..64, got {value!r}")
    return list(dict.fromkeys(chunks))


def cuda_gather_step(label_c: str, chunks: int) -> tuple:
    """(label, `compile_options` keywords) of the sparse step with the CUDA gather at this many chunks per
    block; labels `{label_c}-cuda-gather[-kcK]` (gpubench finds every one by that prefix)."""
    return f"{label_c}-cuda-gather" + (f"-kc{chunks}" if chunks != 1 else ""), {"gather": "cuda", "cuda_chunks": chunks}


def rank_modes(args) -> list:
    """--compare-rank's comma list, checked against `triton_gemv.RANK_MODES`."""
    modes = [m for m in (getattr(args, "compare_rank", None) or "").split(",") if m]
    bad = [m for m in modes if m not in tg.RANK_MODES]
    if bad:
        raise RSparseError(f"--compare-rank: unknown rank mode(s) {bad}; choose from {list(tg.RANK_MODES)}")
    return modes


def _pairs(flag: str, spec: str, form: str, example: str) -> list:
    """One occurrence of an A/B flag, "k=v[,k=v]", as [(key, value text)]; a bad item or none at all
    raises naming the flag."""
    pairs = []
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise RSparseError(f"{flag} {spec!r}: expected {form} items, got {item!r}")
        pairs.append((key, text))
    if not pairs:
        raise RSparseError(f"{flag}: give {form} items, e.g. {example}")
    return pairs


def rank_patches(args) -> list:
    """--rank-ab's settings (each occurrence "KEY=VALUE[,KEY=VALUE]", integers: one more compile of the
    sparse step) as [(tag, {knob: value})], checked by `lowrank.check_knobs`."""
    from .kernels import lowrank

    out = []
    for spec in getattr(args, "rank_ab", None) or []:
        values = {}
        for key, text in _pairs("--rank-ab", spec, "KEY=VALUE", "ZCHUNK_WIDE=0"):
            try:
                values[key] = int(text)
            except ValueError:
                raise RSparseError(f"--rank-ab {spec!r}: {key}'s value must be an integer, got {text!r}") from None
        try:
            lowrank.check_knobs(values)
        except ValueError as e:
            raise RSparseError(f"--rank-ab {spec!r}: {e}") from None
        out.append(("+".join(f"{k}{v}" for k, v in values.items()), values))
    return out


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def inductor_patches(args) -> list:
    """--inductor-ab's settings (each occurrence "key=value[,key=value]": one more pair of compiled
    steps) as [(tag, {inductor config key: value})], every key checked against torch._inductor.config
    and every value of a boolean key read as a boolean ("combo_kernels=1")."""
    import torch
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    out = []
    for spec in getattr(args, "inductor_ab", None) or []:
        patch = {}
        for key, text in _pairs("--inductor-ab", spec, "key=value", "combo_kernels=1"):
            if key not in known:
                raise RSparseError(f"--inductor-ab: torch {torch.__version__}'s inductor has no option {key!r}")
            value = _value(text)
            patch[key] = bool(value) if isinstance(known[key], bool) else value
        out.append(("+".join(k.split(".")[-1] for k in patch), patch))
    return out


def uncached_compiles() -> None:
    """Turn off inductor's FX graph cache and AOTAutograd's cache for this process. The benchmarks
    compile one step several ways, and some choices are read inside our ops at trace time (`TUNED`
    configurations, `--tuned`) where those caches' keys do not see them: a variant could reuse the
    code of the one compiled before it (session 8's rank-mode A/B did; the modes are op arguments now).
    Triton's own kernel cache stays on."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False


@contextlib.contextmanager
def private_inductor_cache():
    """Inductor's on-disk caches in a fresh directory for this run, removed after it, unless
    TORCHINDUCTOR_CACHE_DIR is set (then that one, as the user asked). Its autotune cache keeps each
    kernel's coordinate-descent pick across processes, and `uncached_compiles` leaves it on: a run after
    another on the same machine, on the cache it left (most likely its picks), timed the compiled 50% step at
    299.5 tok/s where fresh tuning read 319.9-323.0 with the same code, and the CUDA-gather step at
    271.9 against 308.8 (session 34). A fresh directory makes every run tune as on a fresh machine."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}  # inductor points
    named = saved["TORCHINDUCTOR_CACHE_DIR"]  # Triton's into its own on first use: both are put back
    if named and os.path.abspath(named) != os.path.abspath(default_cache_dir()):  # (inductor writes its default there)
        yield named
        return
    path = tempfile.mkdtemp(prefix="rsparse-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def compile_options(dec, consumer_reduce="all", inductor=None, kernel_rows=None, rank_terms=None, attention=None,
                    fresh_kernels=False, rank_knobs=None, norm=None, gather=None, cuda_chunks=None):
    """Set while dec's compiled step is traced and captured (all are read at trace time only; norm
    also at every eager call); fresh_kernels: forget the kernel modules inductor loaded so far (see `RETUNE`)."""
    from .kernels import cuda_gather, lowrank
    from .kernels import module as km

    if fresh_kernels:
        from torch._inductor.codecache import PyCodeCache

        PyCodeCache.cache_clear()  # in memory only: compiled steps keep the modules they hold
    saved = km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, tg.RANK_TERMS, dec.attention, lowrank.knobs(), dec.norm, km.GATHER
    try:
        km.use_gather(gather or saved[6])  # first: one that cannot run raises before any switch is set
    except ValueError as e:
        raise RSparseError(str(e)) from None
    dec.use_norm(norm or saved[5])
    try:
        dec.use_attention(attention or saved[3])
    except ValueError:
        dec.use_norm(saved[5])
        km.GATHER = saved[6]
        raise
    chunks = cuda_gather.CHUNKS
    cuda_gather.CHUNKS = chunks if cuda_chunks is None else cuda_chunks
    km.REDUCE_IN_CONSUMER = consumer_reduce
    km.KERNEL_MAX_ROWS = saved[1] if kernel_rows is None else kernel_rows
    tg.RANK_TERMS = saved[2] if rank_terms is None else rank_terms
    lowrank.set_knobs(rank_knobs or {})
    try:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(inductor or {}):
            yield
    finally:
        km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, tg.RANK_TERMS = saved[:3]
        km.GATHER, cuda_gather.CHUNKS = saved[6], chunks
        lowrank.set_knobs(saved[4])
        dec.use_attention(saved[3])
        dec.use_norm(saved[5])
