"""`rsparse bench --device cuda`'s correctness check (`gpubench.check_against_oracle`) on the CPU: a
2-layer float32 Llama, the Triton modules through Triton's interpreter, and a stand-in for the CUDA
graph (its replay runs the sparse step eagerly on the inputs it was "captured" with). The check must
rerun the eager steps on the graph's own token and position: sessions before 14 ran them on token 0
against a graph captured on token 7919 and reported the mismatch as a whole-step error of ~1.4."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from rsparse.decode import GraphDecoder  # noqa: E402
from rsparse.apply import swapped  # noqa: E402
from rsparse.families import locate  # noqa: E402
from rsparse.gpubench import check_against_oracle  # noqa: E402
from rsparse.gpumodel import input_samples, modules_at  # noqa: E402

# where a GPU is visible the kernels compile for it and take CUDA tensors only (session 16 ran this file
# on the H200 with CPU tensors: "Pointer argument cannot be accessed from Triton"); else the interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _graph_stand_in(model, sparse, dec, ids, pos):
    with torch.inference_mode(), swapped(model, sparse):
        out = dec.step(ids, pos).clone()

    def replay():
        with torch.inference_mode(), swapped(model, sparse):
            out.copy_(dec.step(ids, pos))

    return SimpleNamespace(static=((ids, pos), out), replay=replay), out


@pytest.mark.parametrize("token", [7, 41])
def test_check_runs_the_oracle_on_the_graphs_own_token(token, tiny_llama):
    torch.manual_seed(token)
    model = tiny_llama(vocab_size=53).to(DEV)
    projs = locate(model)
    samples = input_samples(model, tokens=64)
    sparse, quantile = modules_at(projs, 0.5, 1.0)
    taus = {k: m.tau for k, m in sparse.items()}
    dec = GraphDecoder(model, max_len=16)
    g, out = _graph_stand_in(model, sparse, dec, torch.tensor([[token]], device=DEV), torch.tensor([5], device=DEV))
    got = check_against_oracle("tiny", model, projs, dec, g, out, taus, samples, sparse, quantile)
    # the same kernels on the same token: equal; the oracle in float32 agrees to rounding
    assert got["graph_vs_eager_triton_rel_err"] == 0.0
    assert got["rel_err"] < 1e-4 and got["argmax_equal"] and got["cosine"] > 0.9999, got
    assert max(got["per_projection_rel_err"].values()) < 1e-5, got
    # the thresholds really cut: about half of a projection's sampled channels fall below tau
    x = samples["0.q"]
    assert 0.3 < (x > taus["0.q"]).float().mean().item() < 0.7


def test_compiled_vs_eager_compares_with_every_channel_kept_and_restores_the_thresholds(tiny_llama):
    """The bench's compiled-step check replays both steps with every threshold at 0: the sparse modules
    then compute the dense product, so a sparse step checked against the dense one agrees to rounding,
    where at the real thresholds they differ; the thresholds are restored after, also on a failure."""
    from rsparse.gpubench import compiled_vs_eager
    from rsparse.gpumodel import set_thresholds

    torch.manual_seed(3)
    model = tiny_llama(vocab_size=53).to(DEV)
    projs = locate(model)
    samples = input_samples(model, tokens=64)
    sparse, _ = modules_at(projs, 0.5, 1.0)
    taus = {k: m.tau for k, m in sparse.items()}
    set_thresholds(taus, samples, {}, 0.5)
    before = {k: t.clone() for k, t in taus.items()}
    dec = GraphDecoder(model, max_len=16)
    ids, pos = torch.tensor([[7]], device=DEV), torch.tensor([5], device=DEV)
    g_sparse, out_sparse = _graph_stand_in(model, sparse, dec, ids, pos)
    g_dense, out_dense = _graph_stand_in(model, {}, dec, ids, pos)
    assert ((out_sparse - out_dense).norm() / out_dense.norm()).item() > 1e-2  # the thresholds cut
    assert compiled_vs_eager((g_sparse, out_sparse), (g_dense, out_dense), taus) < 1e-5
    assert all(torch.equal(taus[k], before[k]) for k in taus) and min(t.item() for t in taus.values()) > 0

    def broken():
        raise RuntimeError("replay failed")

    with pytest.raises(RuntimeError, match="replay failed"):
        compiled_vs_eager((SimpleNamespace(replay=broken), out_sparse), (g_dense, out_dense), taus)
    assert all(torch.equal(taus[k], before[k]) for k in taus)


def test_sparse_samples_thresholds_keep_the_target_in_the_sparse_model(tiny_llama):
    """The bench's thresholds come from the sparse model's own prefill (`sparse_samples`): re-running that
    prefill through the thresholded modules and counting, at every projection, the sampled channels
    above its tau gives each one the target's kept fraction (0.3 at 70%), and `set_thresholds` on the
    returned samples sets the same thresholds again. With 4 layers and 70% the dense model's samples
    would give different thresholds from the second block on (the drift this replaces)."""
    from rsparse.apply import swapped
    from rsparse.gpumodel import _prefill_ids, set_thresholds, sparse_samples

    torch.manual_seed(5)
    model = tiny_llama(num_hidden_layers=4).to(DEV)
    sparse, _ = modules_at(locate(model), 0.7, 1.0, decide_rows=False)
    samples = sparse_samples(model, sparse, {}, 0.7, tokens=256)
    taus = {k: m.tau.clone() for k, m in sparse.items()}
    seen, hooks = {}, []
    for k, m in sparse.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].reshape(-1, args[0].shape[-1])[::4].abs())))
    with torch.inference_mode(), swapped(model, sparse):
        model(_prefill_ids(model, 256), use_cache=False)
    for h in hooks:
        h.remove()
    for k, x in seen.items():
        assert abs((x > taus[k]).float().mean().item() - 0.3) < 0.01, k
    dense = input_samples(model, tokens=256)
    assert any(abs(torch.quantile(dense[k].reshape(-1), 0.7).item() - taus[k].item()) > 1e-3 * taus[k].item()
               for k in taus if not k.startswith("0."))
    for t in (m.tau for m in sparse.values()):
        t.fill_(0.0)
    set_thresholds({k: m.tau for k, m in sparse.items()}, samples, {}, 0.7)
    assert all(torch.equal(sparse[k].tau, taus[k]) for k in taus)


def test_check_covers_a_sparse_head(tiny_llama):
    """`--head-sparsity`: the lm_head joins the projections (`gpumodel.with_head`), takes its threshold
    from the sparse prefill at its own quantile, is in the step (the logits move) and in the oracle."""
    from rsparse.families import HEAD
    from rsparse.gpumodel import sparse_samples, with_head

    torch.manual_seed(11)
    model = tiny_llama(vocab_size=53).to(DEV)
    projs = locate(model)
    sparse, quantile = modules_at(projs, 0.5, 1.0)
    with_head(projs, sparse, quantile, model, 0.4)
    assert projs[HEAD] is model.lm_head and quantile[HEAD] == 0.4 and sparse[HEAD].keep == pytest.approx(0.6)
    samples = sparse_samples(model, sparse, quantile, 0.5, tokens=64)
    taus = {k: m.tau for k, m in sparse.items()}
    dec = GraphDecoder(model, max_len=16)
    ids, pos = torch.tensor([[9]], device=DEV), torch.tensor([5], device=DEV)
    g, out = _graph_stand_in(model, sparse, dec, ids, pos)
    got = check_against_oracle("tiny", model, projs, dec, g, out, taus, samples, sparse, quantile)
    assert got["graph_vs_eager_triton_rel_err"] == 0.0 and got["rel_err"] < 1e-4 and got["argmax_equal"], got
    assert got["triton_vs_oracle_f32_rel_err"] < 1e-4, got  # the float32 oracle has the sparse head too
    x = samples[HEAD]
    assert 0.5 < (x > taus[HEAD]).float().mean().item() < 0.7
    _, out_dense_head = _graph_stand_in(model, {k: m for k, m in sparse.items() if k != HEAD}, dec, ids, pos)
    assert ((out - out_dense_head).norm() / out_dense_head.norm()).item() > 1e-3
