"""Offline model loading."""
import pytest
import torch

from rsparse.errors import RSparseError
from rsparse.families import PROJECTIONS, locate
from rsparse.models import load


def test_loads_offline_and_matches_float64(smol, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = smol()
    assert model.config.model_type == "llama" and len(locate(model)) == 30 * len(PROJECTIONS)
    k = locate(model)["0.k"].weight
    assert tuple(k.shape) == (192, 576)  # grouped-query attention: 3 KV heads of 64
    ids = torch.tensor([tok("Offline models are loaded from local files only.", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out32 = model(ids).logits
        out64 = model.double()(ids).logits
    rel = (out32.double() - out64).norm() / out64.norm()
    assert rel < 1e-4


@pytest.mark.slow  # ~36 s: a second dequantisation of the GGUF; test_loads_offline_and_matches_float64 checks the cache's model
def test_converted_cache_equals_gguf(smol):
    """The float32 cache of the bundled GGUF holds exactly the dequantized GGUF weights."""
    from transformers import AutoModelForCausalLM

    from rsparse.assets import fetch

    model, _ = smol()
    path = fetch("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = direct.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


@pytest.mark.parametrize("name,match", [("no-such-model", "unknown model"), ("/", "not a .gguf")])
def test_bad_model_names(name, match):
    with pytest.raises(RSparseError, match=match):
        load(name)


def test_bad_dtype():
    with pytest.raises(RSparseError, match="dtype"):
        load("smollm2-135m", dtype="int3")
