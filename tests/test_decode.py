"""The lean static-cache decoder against Hugging Face's own forward and generate."""
import pytest
import torch

from rsparse.apply import sparsify_
from rsparse.decode import StaticDecoder
from rsparse.generate import generate_ids


def test_dense_greedy_matches_generate(smol):
    model, tok = smol()
    ids = torch.tensor([tok("The history of the printing press begins", add_special_tokens=False)["input_ids"]])
    dec = StaticDecoder(model, max_len=64)
    ours = dec.greedy(ids, 16)
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_sparse_decode_matches_hf_path(smol, smol_plan50):
    """Prefill dense then sparse steps: same tokens as the HF cache path with the same modules."""
    model, tok = smol()
    sparsify_(model, smol_plan50())
    ids = torch.tensor(tok("Water boils at a temperature of", add_special_tokens=False)["input_ids"])
    ours = StaticDecoder(model, max_len=64).greedy(ids[None], 24)[0].tolist()
    ref = list(generate_ids(model, ids, 24))
    assert ours == ref


def test_graph_step_matches_static_decoder(smol, smol_plan50):
    """The static-shape step (tensor position, masked full-cache attention) gives the logits of the
    slicing decoder on a sparse model at batch 2. In float64: in float32 the two attentions round
    differently (~1e-5 in the logits), enough to flip a channel that sits at its threshold and change
    the logits by ~1 from then on (seen in session 10 with fresh calibration statistics); in float64
    they agree bit for bit."""
    from rsparse.decode import GraphDecoder

    model, tok = smol()
    sparsify_(model, smol_plan50())
    model.double()
    ids = torch.tensor([tok("The river flows", add_special_tokens=False)["input_ids"],
                        tok("Stars are made of", add_special_tokens=False)["input_ids"][:3]])
    ref, ours = StaticDecoder(model, max_len=16, batch=2), GraphDecoder(model, max_len=16, batch=2)
    a, b = ref.prefill(ids), ours.prefill(ids)
    for _ in range(5):
        assert a.dtype == torch.float64 and torch.allclose(a, b, atol=1e-9, rtol=1e-9)
        nxt = a.argmax(-1, keepdim=True)
        b = ours.step(nxt, torch.tensor([ours.pos]))
        ours.pos += 1
        a = ref.forward(nxt)
    assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_fastest_dense_layouts_keep_the_model_and_agreement_of_a_model_with_itself(smol):
    """The dense baseline's layout choices (transposed weights, fused q/k/v and gate/up matmuls,
    re-applied from a recorded choice) decode the same tokens as the plain model; `agreement`
    scores a model against itself as identical."""
    from rsparse.bench import agreement, fastest_dense_
    from rsparse.families import attached_groups

    model, tok = smol()
    plain, _ = smol()
    choice = fastest_dense_(model)
    again, _ = smol()
    fastest_dense_(again, choice=choice)
    assert bool(attached_groups(model)) == any(choice[g].startswith("fused") for g in ("qkv", "gate_up"))
    ids = torch.tensor([tok("The history of the printing press begins", add_special_tokens=False)["input_ids"]])
    ref = StaticDecoder(plain, 64).greedy(ids, 12)
    assert torch.equal(StaticDecoder(model, 64).greedy(ids, 12), ref)
    assert torch.equal(StaticDecoder(again, 64).greedy(ids, 12), ref)
    a = agreement({"self": plain}, plain, ids[:, :12].repeat(1, 2), ids, greedy_steps=4)
    assert a["self"]["mean_kl"] < 1e-9 and a["self"]["top1_agreement"] == 1.0 and a["self"]["greedy_equal_tokens"] == 4


def _tiny_triton_llama(dev):
    """A 2-layer random Llama with R-Sparse modules (rank terms in both groups and in down) swapped to
    their Triton twins, fused groups attached."""
    from rsparse.kernels.module import to_triton_

    m = _tiny_sparse_llama(dev)
    to_triton_(m)
    return m


def _tiny_sparse_llama(dev):
    """A 2-layer random Llama with R-Sparse modules (RSparseLinear; rank terms in q, gate and down)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.apply import modules_for
    from rsparse.families import set_module
    from rsparse.plan import LayerPlan

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval().to(dev)
    ranks = {"q": 16, "gate": 16, "down": 16}
    layers = {f"{i}.{p}": LayerPlan(tau=0.05 * (1 + j), keep=0.5, rank=ranks.get(p, 0))
              for i in range(2) for j, p in enumerate(("q", "k", "v", "o", "gate", "up", "down"))}
    shapes = {"q": (128, 128), "gate": (256, 128), "down": (128, 256)}
    gen = torch.Generator().manual_seed(6)
    factors = {f"{i}.{p}": ((torch.randn(o, ranks[p], generator=gen) / 8).to(dev), (torch.randn(ranks[p], n, generator=gen) / 8).to(dev))
               for i in range(2) for p, (o, n) in shapes.items()}
    for key, mod in modules_for(m, layers, factors).items():
        set_module(m, key, mod)
    return m


def _teacher_forced(step_logits, prefill_logits, ids, steps):
    """Logits of `steps` decode steps fed a fixed random token sequence (no argmax feedback, so a
    rounding difference cannot change what later steps see)."""
    toks = torch.randint(0, 97, (1, steps), generator=torch.Generator().manual_seed(9))
    out = [prefill_logits(ids)]
    for t in range(steps):
        out.append(step_logits(toks[:, t:t + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_cpu_decoder_on_the_cpp_backend(backend):
    """`CompiledDecoder` on the CPU (the C++ kernel as the op `rsparse_cpu::group_run`, fused groups):
    the greedy tokens of the eager static decoder; and, teacher forced, the logits of the same step
    uncompiled (`GraphDecoder.step`): equal under aot_eager (the same ops), within float32 rounding
    under inductor (it fuses the norms and RoPE and may round them differently)."""
    from rsparse.decode import CompiledDecoder, GraphDecoder
    from rsparse.kernels.cpu import to_cpu_backend_

    m = _tiny_sparse_llama("cpu")
    to_cpu_backend_(m)
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(7))
    ref = StaticDecoder(m, max_len=20).greedy(ids, 10)
    assert torch.equal(CompiledDecoder(m, max_len=20, backend=backend).greedy(ids, 10), ref)
    eager, comp = GraphDecoder(m, max_len=20), CompiledDecoder(m, max_len=20, backend=backend)

    def eager_step(tok):
        out = eager.step(tok, torch.tensor([eager.pos]))
        eager.pos += 1
        return out

    with torch.inference_mode():
        a = _teacher_forced(eager_step, eager.prefill, ids, 8)
    b = _teacher_forced(comp.forward, comp.prefill, ids, 8)
    if backend == "aot_eager":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() < 1e-4 * a.abs().max()
    with pytest.raises(ValueError, match="cache holds 20 positions"):
        CompiledDecoder(m, max_len=20, backend=backend).greedy(ids, 15)


def test_compiled_cpu_decoder_skipping_guards_gives_the_same_logits():
    """skip_guards (as `rsparse generate --compile` runs it): the first decode step compiles with guards,
    the later ones run the same code without checking them; teacher forced, the logits equal those of
    the decoder that checks its guards every step, and greedy decoding gives the eager decoder's tokens."""
    from rsparse.decode import CompiledDecoder
    from rsparse.kernels.cpu import to_cpu_backend_

    m = _tiny_sparse_llama("cpu")
    to_cpu_backend_(m)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(11))
    checked, skipping = (CompiledDecoder(m, max_len=20, backend="aot_eager", skip_guards=s) for s in (False, True))
    a = _teacher_forced(checked.forward, checked.prefill, ids, 8)
    b = _teacher_forced(skipping.forward, skipping.prefill, ids, 8)
    assert skipping._warm and torch.equal(a, b)
    ref = StaticDecoder(m, max_len=20).greedy(ids, 10)
    assert torch.equal(CompiledDecoder(m, max_len=20, backend="aot_eager", skip_guards=True).greedy(ids, 10), ref)


def test_two_compiled_decoders_skipping_guards_each_run_their_own_model():
    """Session 17's defect: every decoder's `step` was one code object, so one dynamo cache; with guard
    checks skipped, a dense decoder called after a sparse decoder had compiled ran the sparse model's
    code (the CPU bench's compiled dense step read the sparse step's speed). Each decoder now compiles
    a code object of its own (`decode.fresh_step`): teacher forced, each gives its own model's eager logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.decode import CompiledDecoder
    from rsparse.kernels.cpu import to_cpu_backend_

    sparse = _tiny_sparse_llama("cpu")
    to_cpu_backend_(sparse)
    torch.manual_seed(5)  # the sparse model's base weights, dense
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():
        want = {}
        for name, m in (("dense", dense), ("sparse", sparse)):
            ref = StaticDecoder(m, max_len=20)
            want[name] = _teacher_forced(ref.forward, ref.prefill, ids, 6)
    assert (want["dense"] - want["sparse"]).abs().max() > 0.1  # the models differ
    decs = {n: CompiledDecoder(m, max_len=20, backend="aot_eager", skip_guards=True) for n, m in (("dense", dense), ("sparse", sparse))}
    for name in ("dense", "sparse", "dense", "sparse"):  # the dense decoder again after the sparse one compiled
        got = _teacher_forced(decs[name].forward, decs[name].prefill, ids, 6)
        assert (got - want[name]).abs().max() < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_decode_gives_the_static_decoders_tokens(compile):
    """`GraphDecoder.stream_graphed` (each step a CUDA graph replay, of the compiled step if asked)
    gives the eager static decoder's tokens, with the Triton kernels and fused groups."""
    from rsparse.decode import GraphDecoder

    m = _tiny_triton_llama("cuda")
    ids = torch.randint(0, 97, (1, 6), device="cuda")
    ref = StaticDecoder(m, max_len=20).greedy(ids, 12)
    got = torch.cat(list(GraphDecoder(m, max_len=20).stream_graphed(ids, 12, compile=compile)), 1)
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="cache holds 20 positions"):
        next(GraphDecoder(m, max_len=20).stream_graphed(ids, 15))


def test_tensor_mb_counts_each_storage_once():
    """Hand-computed: a 4x3 float32 weight (48 bytes), the same storage tied again and viewed, a 5-element
    float64 buffer (40 bytes); a transposed copy is a storage of its own."""
    from rsparse.bench import TransposedLinear, tensor_mb

    m = torch.nn.Module()
    m.a = torch.nn.Linear(3, 4, bias=False)
    m.b = torch.nn.Linear(3, 4, bias=False)
    m.b.weight = m.a.weight  # tied
    m.register_buffer("v", m.a.weight.detach()[1:])  # a view of the same storage
    m.register_buffer("d", torch.zeros(5, dtype=torch.float64))
    assert tensor_mb(m) * 2**20 == 48 + 40
    m.t = TransposedLinear(m.a)
    assert tensor_mb(m) * 2**20 == 2 * 48 + 40
