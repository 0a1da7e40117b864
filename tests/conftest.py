import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter, which `triton.jit` consults when a kernel
# is defined: set before any test module imports rsparse's kernels (on a GPU machine they compile)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    """A factory for small random-weight Llama models in eval mode (2 layers, hidden 64, 4 heads over 2
    KV heads, head dim 16, vocabulary 50); keyword arguments override the config. Seed before calling."""
    def make(**overrides):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=50, max_position_embeddings=64)
        return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()

    return make


@pytest.fixture(scope="session")
def smol():
    """A loader for fresh copies of the bundled model (sparsify_ changes a model in place)."""
    from rsparse.models import load

    load("smollm2-135m")  # first call converts the GGUF once; later loads take ~1 s
    return lambda: load("smollm2-135m")


@pytest.fixture(scope="session")
def smol_stats(smol):
    """Calibration statistics from 4 windows x 512 tokens (128 sampled for error tables) of the Wikipedia
    calibration split (session 43 on 2 cores: 4 x 1024 with 256 sampled took 183 s, 4 x 512 with 256
    sampled 127 s; the spectra, ~25 s, do not shrink)."""
    from rsparse.pipeline import observe

    model, tok = smol()
    torch.manual_seed(0)
    return observe(model, tok, tokens=2048, length=512, seed=0, sample_tokens=128, progress=False)


@pytest.fixture(scope="session")
def smol_plan50(smol, smol_stats):
    """A factory for copies of the default R-Sparse plan at 50% on `smol_stats` (rank terms; their
    float64 SVDs take ~17 s on 2 cores, once per session instead of once per test that needs it).
    Each call returns a deep copy, so no test sees another's changes."""
    import copy

    from rsparse.plan import RSparseConfig, build_plan

    model, _ = smol()
    plan = build_plan(model, smol_stats, RSparseConfig(sparsity=0.5))
    return lambda: copy.deepcopy(plan)
