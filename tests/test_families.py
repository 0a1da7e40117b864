"""Every row of the family table, on a small random model of that family (built from its transformers
config, no download): the decode loops against the model's own forward in float64, and calibration +
module swap finding and replacing all seven projections."""
import pytest
import torch

from rsparse.families import FAMILIES, locate
from cases import grid, slow_on_cpu

SHAPE = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
# Granite's scalars, chosen far from 1 (and from 1/sqrt(head dim)) so that a decoder ignoring one fails
EXTRA = {"granite": dict(embedding_multiplier=6.0, residual_multiplier=0.3, attention_multiplier=1.5, logits_scaling=4.0),
         "smollm3": dict(no_rope_layer_interval=2, pad_token_id=None),  # block 1 of 2 without the rotary embedding
         "phi3": dict(pad_token_id=None),
         # Gemma 2's caps low enough to bite on small random scores; its blocks alternate sliding and full
         "gemma2": dict(attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
         # a sliding block and a full one: the two rotary bases (10^4, 10^6) both in use
         "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"])}
# Gemma 2's own (eager) attention takes its softmax in float32 even in a float64 model: its logits carry
# float32 rounding (~1e-7 here; the decoders' softmax is float64's own)
ATOL = {"gemma2": 1e-6}
# sliding windows on some blocks (`families.windows`), where the config does not already alternate them
SLIDING = {"qwen2": dict(use_sliding_window=True, max_window_layers=1), "qwen3": dict(use_sliding_window=True, max_window_layers=1),
           "smollm3": dict(layer_types=["full_attention", "sliding_attention"])}


def family_model(model_type: str, **overrides):
    """A 2-block random model of `model_type`, its norm weights drawn away from their init (a decoder
    that skips a norm, or applies it at the wrong place, then gives other logits)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "gemma3":  # the vision-language model: its text decoder from text_config, a tiny vision tower
        cfg = AutoConfig.for_model("gemma3", text_config={**SHAPE, **EXTRA["gemma3_text"], **overrides}, mm_tokens_per_image=4,
                                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, image_size=28, patch_size=14))
    else:
        cfg = AutoConfig.for_model(model_type, **{**SHAPE, **EXTRA.get(model_type, {}), **overrides})
    # Gemma 2's soft-capping exists only in transformers' eager attention (5.17 picked SDPA and dropped the cap)
    model = AutoModelForCausalLM.from_config(cfg, **({"attn_implementation": "eager"} if model_type == "gemma2" else {})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if model_type == "gemma" else 1.0))  # Gemma norms scale by 1 + w
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


PROMPT = 7  # tokens prefilled before the decode steps the tests compare


def decoded(dec, ids):
    """A decoder's logits after prefilling ids' first PROMPT tokens, then at each later token, one step
    each: StaticDecoder.forward, or GraphDecoder.step (the compiled and graphed steps' code) at its
    position. Compare with hf_logits(model, ids)[PROMPT - 1:]."""
    from rsparse.decode import GraphDecoder

    with torch.inference_mode():
        out = [dec.prefill(ids[:, :PROMPT])[0]]
        for t in range(PROMPT, ids.shape[1]):
            if isinstance(dec, GraphDecoder):
                out.append(dec.step(ids[:, t:t + 1], torch.tensor([t], device=ids.device))[0])
                dec.pos += 1
            else:
                out.append(dec.forward(ids[:, t:t + 1])[0])
    return torch.stack(out)


def assert_decoders_give(model, ids, ref, max_len: int, atol: float):
    """StaticDecoder and GraphDecoder's step (the compiled and graphed steps' code, SDPA, the model's own
    norms) give the logits ref (the model's forward after the prompt) to atol."""
    from rsparse.decode import GraphDecoder, StaticDecoder

    torch.testing.assert_close(decoded(StaticDecoder(model, max_len=max_len), ids), ref, rtol=0, atol=atol)
    graph = GraphDecoder(model, max_len=max_len, attention="sdpa", norm="torch")
    torch.testing.assert_close(decoded(graph, ids), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_decode_loops_match_the_familys_own_forward(model_type):
    torch.manual_seed(1)
    model = family_model(model_type).double()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 11))
    ref = hf_logits(model, ids)[PROMPT - 1:]  # the logits after the prompt, then 4 decode steps
    assert ref.abs().max() > 1e-3  # logits that say something
    assert_decoders_give(model, ids, ref, 12, ATOL.get(model_type, 1e-10))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_calibration_and_swap_cover_every_projection(model_type):
    from rsparse.apply import sparse_modules, sparsify_
    from rsparse.calibrate import collect
    from rsparse.plan import RSparseConfig, build_plan

    torch.manual_seed(2)
    model = family_model(model_type)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 16))
    dense = hf_logits(model, ids)
    stats = collect(model, torch.randint(0, SHAPE["vocab_size"], (4, 24)), sample_tokens=48, progress=False)
    sparsify_(model, build_plan(model, stats, RSparseConfig(sparsity=0.5)))
    mods = sparse_modules(model)
    assert sorted(mods) == sorted(locate(model)) and len(mods) == 7 * SHAPE["num_hidden_layers"]
    assert not any(p.is_inference() for p in model.parameters())  # Phi-3's parts were split inside inference mode
    assert (hf_logits(model, ids) - dense).abs().max() > 1e-3 * dense.abs().max()  # the plan drops channels (float32 noise: ~1e-6)
    for m in mods.values():
        m.tau.fill_(-1.0)  # every channel kept: the swapped modules compute the dense product again
    torch.testing.assert_close(hf_logits(model, ids), dense, rtol=1e-4, atol=1e-5)


WINDOWED = sorted(t for t, f in FAMILIES.items() if f.window)


@pytest.mark.parametrize("model_type", WINDOWED)
def test_sliding_windows_decode_as_the_familys_own_forward(model_type):
    """A window of 4 positions, shorter than the prompt (7) and the decode (13): the prefill's banded
    mask and each step's slice (StaticDecoder) or masked slots (GraphDecoder) against the model's own
    forward, float64; the window must change the logits for the comparison to say anything."""
    from rsparse.families import text_config, windows

    torch.manual_seed(7)
    model = family_model(model_type, sliding_window=4, **SLIDING.get(model_type, {})).double()
    assert 4 in windows(model)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 13))
    ref = hf_logits(model, ids)[PROMPT - 1:]
    text_config(model).sliding_window = 64  # the same weights with a window longer than the text
    assert (hf_logits(model, ids)[PROMPT - 1:] - ref).abs().max() > 1e-3
    text_config(model).sliding_window = 4
    assert_decoders_give(model, ids, ref, 16, ATOL.get(model_type, 1e-10))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "gemma3", "qwen2"])
def test_block_by_block_calibration_gives_each_block_its_own_masks_and_rotary_tables(model_type):
    """What calibration and the search's fitness run (`calibrate.block_inputs`, then one block at a
    time) gives the model's own logits: each block gets its layer type's mask (window 4 of 12
    positions) and rotary table (Gemma 3's two bases). With block 0's for every block it does not."""
    from rsparse.calibrate import block_inputs, layer_out
    from rsparse.families import blocks, final_logits, scalars, text_model

    torch.manual_seed(9)
    model = family_model(model_type, sliding_window=4, **SLIDING.get(model_type, {})).double()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12))
    ref = hf_logits(model, ids[:1]), hf_logits(model, ids[1:])
    ((hs, kws),) = block_inputs(model, ids, batch=2)
    assert len(kws) == 2 and kws[0] is not kws[1]

    def logits(kw_of):
        h = hs
        for i, layer in enumerate(blocks(model)):
            h = layer_out(layer, h, kw_of(i))
        return final_logits(scalars(model), model.lm_head(text_model(model).norm(h)))

    with torch.no_grad():
        got, first_only = logits(lambda i: kws[i]), logits(lambda i: kws[0])
    torch.testing.assert_close(got, torch.stack(ref), rtol=0, atol=1e-10)
    assert (first_only - got).abs().max() > 1e-3


@pytest.mark.parametrize("model_type,attention", grid(["mistral", "gemma2", "gemma3_text", "gemma3"], ["triton", "fused"], reps=1))
def test_the_triton_attention_kernels_take_windows_and_caps(model_type, attention):
    """The kernels' window and soft-cap (Gemma 2) in the graphed step, the interpreter on the CPU,
    float32, window 4 of up to 13 positions."""
    pytest.importorskip("triton")
    from rsparse.decode import GraphDecoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(8)
    model = family_model(model_type, sliding_window=4).to(dev)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 13), device=dev)
    ref = hf_logits(model, ids)[PROMPT - 1:]
    got = decoded(GraphDecoder(model, max_len=16, attention=attention), ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("model_type,attention", grid(["qwen3", "olmo2", "granite", "smollm3", "phi3"], ["triton", "fused"], reps=1))
def test_triton_attention_steps_match_the_familys_forward(model_type, attention):
    """The families whose q and k differ from the projections' (normed, scaled) through the Triton
    attention kernels (the interpreter on the CPU), float32."""
    pytest.importorskip("triton")
    from rsparse.decode import GraphDecoder

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    model = family_model(model_type).to(dev)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 9), device=dev)
    ref = hf_logits(model, ids)[PROMPT - 1:]
    got = decoded(GraphDecoder(model, max_len=12, attention=attention), ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("model_type", ["qwen3", slow_on_cpu("granite"), slow_on_cpu("smollm3"), slow_on_cpu("phi3")])
def test_grouped_triton_modules_give_the_static_decoders_logits(model_type):
    """A sparse model on the Triton modules with q|k|v fused: the graphed step with the fused attention
    (which takes the group's joined output only where q and k go to attention as projected) against
    StaticDecoder on the same modules."""
    pytest.importorskip("triton")
    import warnings

    from rsparse.apply import sparsify_
    from rsparse.calibrate import collect
    from rsparse.decode import GraphDecoder, StaticDecoder
    from rsparse.families import attached_groups
    from rsparse.kernels.module import to_triton_
    from rsparse.plan import RSparseConfig, build_plan

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(4)
    model = family_model(model_type)
    stats = collect(model, torch.randint(0, SHAPE["vocab_size"], (4, 24)), sample_tokens=48, progress=False)
    sparsify_(model, build_plan(model, stats, RSparseConfig(sparsity=0.5)))
    model = model.to(dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks that are not multiples of 16 are padded, with a warning
        to_triton_(model)
    assert attached_groups(model)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 6), device=dev)
    static, graph = StaticDecoder(model, 12), GraphDecoder(model, 12, attention="fused")
    with torch.inference_mode():
        ls, lg = static.prefill(ids), graph.prefill(ids)
        for t in range(3):
            tok = ls.argmax(-1, keepdim=True)
            ls = static.forward(tok)
            lg = graph.step(tok, torch.tensor([6 + t], device=dev))
            assert ((lg - ls).norm() / ls.norm()).item() < 1e-4, t


def test_the_fused_norm_is_refused_for_norms_on_sublayer_outputs():
    """The fused norm kernel adds the residual and norms the sum: OLMo2 norms what it adds instead."""
    pytest.importorskip("triton")
    from rsparse.decode import GraphDecoder

    with pytest.raises(ValueError, match="norms its sublayers' outputs"):
        GraphDecoder(family_model("olmo2"), max_len=8, norm="fused")
    assert GraphDecoder(family_model("olmo2"), max_len=8).norm == "torch"  # auto: the model's own norms


def test_a_partial_rotary_embedding_decodes_as_the_model_does():
    """Phi-4-mini-style: the rotary embedding turns only the first half of each head's dims. The fused
    attention kernel rotates whole heads, so it is refused by name and "auto" does not pick it."""
    from rsparse.decode import GraphDecoder

    torch.manual_seed(5)
    model = family_model("phi3", partial_rotary_factor=0.5).double()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 10))
    ref = hf_logits(model, ids)[PROMPT - 1:]
    assert_decoders_give(model, ids, ref, 12, 1e-10)
    if pytest.importorskip("triton"):
        with pytest.raises(ValueError, match="rotates 8 of each head's 16 dims"):
            GraphDecoder(model, max_len=12, attention="fused")


def test_a_fresh_phi3_decodes_without_being_located_first():
    """The decoder splits Phi-3's fused projections itself: nothing else has to call `locate` first."""
    from rsparse.decode import StaticDecoder

    torch.manual_seed(6)
    model = family_model("phi3").double()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 5))
    ref = hf_logits(model, ids)[-1]
    torch.testing.assert_close(StaticDecoder(model, 8).forward(ids)[0], ref, rtol=0, atol=1e-10)


def test_gemma_models_of_an_older_transformers_layout_are_refused_by_name():
    """transformers 4.x scaled Gemma's embeddings in the model's forward (a plain nn.Embedding) and gave
    Gemma 3 one rotary embedding per base; the decode loops follow transformers 5, so such a model is
    refused with a message rather than decoded without its embedding scale."""
    import torch.nn as nn

    from rsparse.decode import StaticDecoder
    from rsparse.errors import RSparseError

    for model_type in ("gemma", "gemma2"):
        model = family_model(model_type)
        model.model.embed_tokens = nn.Embedding(SHAPE["vocab_size"], SHAPE["hidden_size"])
        with pytest.raises(RSparseError, match="embeddings scaled in the model's forward"):
            StaticDecoder(model, max_len=8)
    model = family_model("gemma3_text")

    class OneBase(nn.Module):
        def forward(self, x, position_ids):
            raise AssertionError("not called")

    model.model.rotary_emb = OneBase()
    with pytest.raises(RSparseError, match="one rotary embedding per base"):
        StaticDecoder(model, max_len=8)
