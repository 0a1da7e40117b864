"""The lean static-cache decoder against Hugging Face's own forward and generate."""
import torch

from rsparse.apply import sparsify_
from rsparse.decode import StaticDecoder
from rsparse.generate import generate_ids
from rsparse.plan import RSparseConfig, build_plan


def test_dense_greedy_matches_generate(smol):
    model, tok = smol()
    ids = torch.tensor([tok("The history of the printing press begins", add_special_tokens=False)["input_ids"]])
    dec = StaticDecoder(model, max_len=64)
    ours = dec.greedy(ids, 16)
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)


def test_sparse_decode_matches_hf_path(smol, smol_stats):
    """Prefill dense then sparse steps: same tokens as the HF cache path with the same modules."""
    model, tok = smol()
    sparsify_(model, build_plan(model, smol_stats, RSparseConfig(sparsity=0.5)))
    ids = torch.tensor(tok("Water boils at a temperature of", add_special_tokens=False)["input_ids"])
    ours = StaticDecoder(model, max_len=64).greedy(ids[None], 24)[0].tolist()
    ref = list(generate_ids(model, ids, 24))
    assert ours == ref
