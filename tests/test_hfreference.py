"""The bench's Hugging Face `generate` reference row decodes what our dense decoder decodes (so the
two rows time the same work) and refuses unknown modes by name."""
import pytest
import torch

from rsparse.decode import StaticDecoder
from rsparse.errors import RSparseError
from rsparse.hfreference import hf_generate, hf_generate_tok_s, hf_modes


@pytest.fixture
def tiny(tiny_llama):
    torch.manual_seed(3)
    return tiny_llama(vocab_size=61, eos_token_id=5)


@pytest.mark.parametrize("mode", ["eager", "compiled"])  # compiled: static cache (transformers compiles only on GPUs)
def test_generate_reference_decodes_our_dense_tokens(mode, tiny):
    model = tiny
    prompt = torch.tensor([[3, 17, 29, 40], [8, 8, 50, 1]])
    ours = StaticDecoder(model, max_len=32, batch=2).greedy(prompt, 12)
    theirs = hf_generate(model, prompt, 12, mode)
    assert theirs.shape == (2, 12) and torch.equal(theirs, ours)  # eos 5 may appear: min = max keeps going
    got = hf_generate_tok_s(model, 2, 6, mode)
    assert set(got) == {f"hf_generate_{mode}_tok_s", f"hf_generate_{mode}_first_call_s"}
    assert got[f"hf_generate_{mode}_tok_s"] > 0 and got[f"hf_generate_{mode}_first_call_s"] > 0


def test_reference_modes_are_checked(tiny):
    assert hf_modes("eager,compiled") == ["eager", "compiled"] and hf_modes("none") == hf_modes("") == []
    with pytest.raises(RSparseError, match=r"unknown mode\(s\) \['graph'\]"):
        hf_modes("eager,graph")
    with pytest.raises(ValueError, match="mode must be one of"):
        hf_generate(tiny, torch.tensor([[1, 2]]), 2, "graph")
