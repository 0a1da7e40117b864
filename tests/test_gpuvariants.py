"""The bench's A/B variants: which compiled steps a flag adds, and that the switches a variant sets
hold only while its step is traced (restored after it, also when tracing fails)."""
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from rsparse.decode import GPU_INDUCTOR, GraphDecoder, gpu_inductor  # noqa: E402
from rsparse.errors import RSparseError  # noqa: E402
from rsparse.gpuvariants import (compile_options, compiled_variants, inductor_patches, private_inductor_cache,  # noqa: E402
                                 rank_modes, rank_patches, skip_compile)
from rsparse.kernels import lowrank  # noqa: E402
from rsparse.kernels import module as km  # noqa: E402
from rsparse.kernels import triton_gemv as tg  # noqa: E402


def _args(**kw):
    base = dict(compare_reduce=False, inductor_ab=None, masked_dense=False, compare_rank=None, rank_ab=None,
                compare_attention=False, tuned_dense=False)
    return SimpleNamespace(**dict(base, **kw))


TUNED = {"inductor": {"coordinate_descent_tuning": True, "combo_kernels": True}}  # decode.GPU_INDUCTOR, spelled out


def test_variants_follow_the_flags():
    # the cuBLAS dense under inductor's defaults; every other step under the tuned settings
    plain = compiled_variants(_args(), "fused", "S", "G", 1)
    assert [(v[0], v[1], v[3]) for v in plain] == [("dense", {}, {}), ("fused", "S", TUNED)]
    for B in (1, 2):  # the CLI's default: the tuned dense at every batch
        both = compiled_variants(_args(tuned_dense=True), "fused", "S", "G", B)
        assert [(v[0], v[1], v[3]) for v in both] == [("dense", {}, {}), ("dense-tuned", {}, TUNED), ("fused", "S", TUNED)]
    got = compiled_variants(_args(compare_rank="gather,epilogue", masked_dense=True), "fused", "S", "G", 1)
    assert [(v[0], v[3]) for v in got[2:]] == [("fused-rank-gather", {"rank_terms": "gather", **TUNED}),
                                               ("fused-rank-epilogue", {"rank_terms": "epilogue", **TUNED})]  # masked dense: batch > 1 only
    assert compiled_variants(_args(masked_dense=True), "fused", "S", "G", 4)[-1][3] == {"kernel_rows": 0, **TUNED}
    z = compiled_variants(_args(rank_ab=["ZCHUNK_WIDE=0", " ZCHUNK_WIDE=256, "]), "fused", "S", "G", 1)[2:]
    assert [(v[0], v[3]) for v in z] == [("fused-ZCHUNK_WIDE0", {"rank_knobs": {"ZCHUNK_WIDE": 0}, **TUNED}),
                                         ("fused-ZCHUNK_WIDE256", {"rank_knobs": {"ZCHUNK_WIDE": 256}, **TUNED})]
    ab = compiled_variants(_args(compare_attention=True, attention="sdpa"), "fused", "S", "G", 2)[2:]
    assert [(v[0], v[1], v[3]) for v in ab] == [("dense-attn-fused", {}, {"attention": "fused", **TUNED}),
                                                ("fused-attn-fused", "S", {"attention": "fused", **TUNED})]
    assert compiled_variants(_args(compare_attention=True, attention="triton"), "fused", "S", "G", 1)[-1][3] == {"attention": "sdpa", **TUNED}
    cg = compiled_variants(_args(compare_gather=True), "fused", "S", "G", 2)[2:]
    assert [(v[0], v[1], v[3]) for v in cg] == [("fused-cuda-gather", "S", {"gather": "cuda", "cuda_chunks": 1, **TUNED})]
    kc = compiled_variants(_args(compare_gather="1, 4,4"), "fused", "S", "G", 1)[2:]  # as the CLI passes it
    assert [(v[0], v[3]) for v in kc] == [("fused-cuda-gather", {"gather": "cuda", "cuda_chunks": 1, **TUNED}),
                                          ("fused-cuda-gather-kc4", {"gather": "cuda", "cuda_chunks": 4, **TUNED})]
    for bad in ("0", "1,x", "65", ","):
        with pytest.raises(RSparseError, match="--compare-gather takes a comma list of 256-channel chunks per block"):
            compiled_variants(_args(compare_gather=bad), "fused", "S", "G", 1)
    named = compiled_variants(_args(compare_attention="fused", attention="triton"), "fused", "S", "G", 1)[2:]
    assert [(v[0], v[3]) for v in named] == [("dense-attn-fused", {"attention": "fused", **TUNED}),
                                             ("fused-attn-fused", {"attention": "fused", **TUNED})]
    assert GPU_INDUCTOR == TUNED["inductor"] == gpu_inductor()  # this torch takes both
    # an older torch: combo kernels left out (their scheduler fixes landed up to 2.9)
    assert gpu_inductor(version=(2, 8)) == {"coordinate_descent_tuning": True}
    with pytest.raises(RSparseError, match=r"unknown rank mode\(s\) \['own-z'\]"):
        rank_modes(_args(compare_rank="one-launch,own-z"))
    knobs = lowrank.knobs()
    for spec, message in (("ZCHUNK_WIDE=wide", "ZCHUNK_WIDE's value must be an integer"),
                          ("ZCHUNK_WIDE", "expected KEY=VALUE items"),
                          ("ZCHUNK_WIDE=96", "ZCHUNK_WIDE must be 0 or a power of two >= 16, got 96"),
                          ("ZCHUNK=512", "unknown rank-path knob 'ZCHUNK'"),
                          (" , ", "give KEY=VALUE items")):
        with pytest.raises(RSparseError, match=message):
            rank_patches(_args(rank_ab=[spec]))
        assert lowrank.knobs() == knobs  # a refused spec sets nothing


def test_compile_options_set_and_restore_the_switches(tiny_llama):
    dec = GraphDecoder(tiny_llama(), max_len=8)
    before = (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, dec.attention, dec.attend)
    knobs = lowrank.knobs()
    with compile_options(dec, consumer_reduce="none", kernel_rows=2, rank_terms="gather", attention="triton",
                         rank_knobs={"ZCHUNK_WIDE": 0}, norm="fused", cuda_chunks=4):
        assert (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, dec.attention) == ("gather", "none", 2, "triton")
        assert km.cuda_gather.CHUNKS == 4
        assert dec.norm == "fused"
        assert dec.attend is not before[4]
        assert lowrank.z_chunk(4096, 14336) == lowrank.RANKED_TILES["ZCHUNK"]
    assert lowrank.knobs() == knobs and dec.norm == "torch" and km.cuda_gather.CHUNKS == 1
    assert (tg.RANK_TERMS, km.REDUCE_IN_CONSUMER, km.KERNEL_MAX_ROWS, dec.attention) == before[:4] == (*before[:3], "sdpa")
    with pytest.raises(ZeroDivisionError):
        with compile_options(dec, rank_terms="epilogue", attention="triton", cuda_chunks=2):
            1 / 0
    assert (tg.RANK_TERMS, dec.attention, km.cuda_gather.CHUNKS) == (before[0], "sdpa", 1)
    with pytest.raises(ValueError, match="attention must be one of"):
        with compile_options(dec, attention="flash", norm="fused"):
            pass
    assert dec.norm == "torch"  # a refused switch leaves none set
    with pytest.raises(ValueError, match="norm must be one of"):
        with compile_options(dec, norm="layer"):
            pass
    assert dec.attention == "sdpa"
    if not km.cuda_gather.available():  # the CUDA gather where it cannot run: refused before any switch is set
        with pytest.raises(RSparseError, match="the CUDA gather cannot run here"):
            with compile_options(dec, gather="cuda", rank_terms="gather"):
                pass
        assert km.GATHER == "triton" and tg.RANK_TERMS == before[0]


def test_inductor_ab_adds_a_pair_per_setting_and_patches_only_while_traced(tiny_llama):
    import torch._inductor.config as inductor_config

    args = _args(inductor_ab=["combo_kernels=1", "triton.enable_pdl=true, coordinate_descent_tuning=0"])
    assert inductor_patches(args) == [("combo_kernels", {"combo_kernels": True}),
                                      ("enable_pdl+coordinate_descent_tuning",
                                       {"triton.enable_pdl": True, "coordinate_descent_tuning": False})]
    got = compiled_variants(args, "fused", "S", "G", 1)[2:]  # each A/B updates the tuned settings
    pdl = {"inductor": {"triton.enable_pdl": True, "coordinate_descent_tuning": False, "combo_kernels": True}}
    assert [(v[0], v[1], v[3]) for v in got] == [
        ("dense-combo_kernels", {}, TUNED), ("fused-combo_kernels", "S", TUNED),
        ("dense-enable_pdl+coordinate_descent_tuning", {}, pdl), ("fused-enable_pdl+coordinate_descent_tuning", "S", pdl)]
    before = inductor_config.combo_kernels
    dec = GraphDecoder(tiny_llama(), max_len=8)
    with compile_options(dec, inductor={"combo_kernels": not before}):
        assert inductor_config.combo_kernels is (not before)
    assert inductor_config.combo_kernels is before
    for bad, msg in ((["no_such_knob=1"], "has no option 'no_such_knob'"), (["combo_kernels"], "expected key=value"),
                     ([" , "], "give key=value items")):
        with pytest.raises(RSparseError, match=msg):
            inductor_patches(_args(inductor_ab=bad))


def test_retune_repeats_both_tuned_steps_with_fresh_kernels_while_traced(tiny_llama):
    """--retune N: N compiles each of the tuned dense and the sparse step; the repeats bypass inductor's
    autotune cache on disk and forget the kernel modules it loaded (their autotuners keep their picks),
    so each repeat tunes anew; the cache setting holds only while the step is traced."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    fresh = {"inductor": {"autotune_local_cache": False, **TUNED["inductor"]}, "fresh_kernels": True}
    got = compiled_variants(_args(tuned_dense=True, retune=3), "fused", "S", "G", 1)
    assert [(v[0], v[1], v[3]) for v in got] == [
        ("dense", {}, {}), ("dense-tuned", {}, TUNED), ("fused", "S", TUNED), ("dense-tuned-2", {}, fresh),
        ("fused-2", "S", fresh), ("dense-tuned-3", {}, fresh), ("fused-3", "S", fresh)]
    # without the tuned dense only the sparse step repeats
    assert [v[0] for v in compiled_variants(_args(retune=2), "fused", "S", "G", 1)] == ["dense", "fused", "fused-2"]
    # --compare-gather repeats too: each gather's best compile against the other's
    both = compiled_variants(_args(retune=2, compare_gather=True), "fused", "S", "G", 1)
    assert [(v[0], v[3]) for v in both[1:]] == [("fused", TUNED), ("fused-cuda-gather", {"gather": "cuda", "cuda_chunks": 1, **TUNED}),
                                                ("fused-2", fresh), ("fused-cuda-gather-2", {"gather": "cuda", "cuda_chunks": 1, **fresh})]
    dec = GraphDecoder(tiny_llama(), max_len=8)
    before = inductor_config.autotune_local_cache
    PyCodeCache.modules_no_attr["/stand/in.py"] = object()
    with compile_options(dec, **fresh):
        assert inductor_config.autotune_local_cache is False and "/stand/in.py" not in PyCodeCache.modules_no_attr
    assert inductor_config.autotune_local_cache is before


def test_fresh_step_is_traced_again_where_the_same_step_is_not(tiny_llama):
    """The defect behind session 6's and 16's inductor A/Bs: a second torch.compile of dec.step reuses
    dynamo's code for it (inductor settings are not among its guards); fresh_step is traced anew and
    computes the same logits."""
    import torch

    from rsparse.decode import fresh_step

    torch.manual_seed(0)
    dec = GraphDecoder(tiny_llama(), max_len=8)
    traces = []

    def counting(gm, example_inputs):
        traces.append(gm)
        return gm.forward

    ids, pos = torch.tensor([[3]]), torch.tensor([2])
    with torch.inference_mode():
        torch._dynamo.reset()
        a = torch.compile(dec.step, backend=counting)(ids, pos)
        torch.compile(dec.step, backend=counting)(ids, pos)
        assert len(traces) == 1  # the second compile hit the first one's code
        b = torch.compile(fresh_step(dec), backend=counting)(ids, pos)
        assert len(traces) == 2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(b, dec.step(ids, pos), rtol=0, atol=0)
    torch._dynamo.reset()


def test_private_inductor_cache_is_fresh_and_removed_unless_the_user_named_one(tmp_path, monkeypatch):
    """Each bench run tunes in a directory of its own (a run on a machine an earlier run had tuned read
    its picks, session 34); a directory the user names is used as it is; inductor's own default, which
    inductor writes into the variable itself, counts as unnamed."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with private_inductor_cache() as a:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == a and os.path.isdir(a) and not os.listdir(a)
        (tmp_path / "x").write_text("x")
        open(os.path.join(a, "best_config"), "w").close()
        os.environ["TRITON_CACHE_DIR"] = os.path.join(a, "triton", "0")  # as inductor sets it on first use
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and not os.path.exists(a)
    assert "TRITON_CACHE_DIR" not in os.environ  # not left naming a removed directory
    with private_inductor_cache() as b:
        assert b != a
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with private_inductor_cache() as mine:
        assert mine == str(tmp_path) == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert (tmp_path / "x").exists()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    with private_inductor_cache() as c:
        assert c != default_cache_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == c
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() and not os.path.exists(c)


def test_skip_compile_only_for_ab_steps_that_would_end_past_the_limit():
    """Session 34's first run: 590 s in, still compiling its 5th step, killed, nothing saved."""
    assert not skip_compile("dense", "fused", 500, 120, 540) and not skip_compile("fused", "fused", 500, 120, 540)
    assert skip_compile("fused-2", "fused", 450, 117, 540)  # 450 + 117 > 540
    assert not skip_compile("fused-2", "fused", 400, 117, 540)
    assert skip_compile("dense-tuned", "sparse", 541, 0, 540)  # already past it
    assert not skip_compile("fused-cuda-gather", "fused", 100, 117, 540)
