"""The lm_head sparsified with the blocks (`RSparseConfig.head_sparsity`): its calibration statistics
against its real inputs, the plan's byte accounting by hand, the swapped head against a float64 hand
computation of thresholded logits, artifacts, refinement, counting, backends and bad input."""
import dataclasses
import json

import pytest
import torch

from rsparse import artifact
from rsparse.apply import counting_kept, dense_view, measure_sparsity, sparse_modules, sparsify_
from rsparse.calibrate import collect
from rsparse.errors import RSparseError
from rsparse.families import HEAD
from rsparse.linear import RSparseLinear
from rsparse.plan import RSparseConfig, build_plan, expected_sparsity, summarize, total_sparsity
from rsparse.refine import refine_thresholds_

IDS = torch.tensor([[504, 3458, 282, 260, 1345, 28, 2151, 30, 378, 4563, 314, 253, 1530, 1127]])


def _head_inputs(model, ids):
    """The lm_head's inputs of a plain forward, as float64 rows (the independent record)."""
    seen = []
    tap = model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().reshape(-1, a[0].shape[-1])))
    try:
        with torch.inference_mode():
            logits = model(ids).logits
    finally:
        tap.remove()
    return torch.cat(seen), logits


def test_head_statistics_are_the_lm_head_inputs(tiny_llama):
    """collect's head histograms hold exactly the scores of what the lm_head receives in a forward."""
    torch.manual_seed(3)
    model = tiny_llama()
    windows = torch.randint(0, 50, (6, 24))
    stats = collect(model, windows, sample_tokens=32, scores=(), ranks=(0,), progress=False)
    X, _ = _head_inputs(model, windows)
    col = model.lm_head.weight.detach().double().norm(dim=0)
    assert stats.head.shape == (50, 64) and stats.head.sample == []
    for score, s in (("abs", X.abs()), ("wnorm", X.abs() * col)):
        hist = stats.head.hist[score]
        assert hist.counts.sum().item() == X.numel()
        for q in (0.1, 0.5, 0.9):
            assert hist.quantile(q) == pytest.approx(torch.quantile(s.flatten(), q).item(), rel=0.02)


def test_head_plan_accounting_swap_and_thresholded_logits(smol, smol_stats, tmp_path):
    model, _ = smol()
    plan = build_plan(model, smol_stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.5, head_sparsity=0.3))
    lp = plan.layers[HEAD]
    assert (lp.keep, lp.rank, lp.score) == (pytest.approx(0.7), 0, "wnorm")
    assert lp.tau == pytest.approx(smol_stats.head.hist["wnorm"].quantile(0.3), rel=1e-12)
    assert plan.head_shape == [49152, 576]
    # bytes by hand: the blocks at 50% (uniform TEAL: kept columns only) and 70% of the head's columns
    blocks = sum(o * i for o, i in plan.shapes.values())
    head = 49152 * 576
    assert plan.expected_sparsity() == pytest.approx(0.5, abs=1e-9)
    assert plan.expected_total_sparsity() == pytest.approx(1 - (0.5 * blocks + 0.7 * head) / (blocks + head), abs=1e-9)
    assert "lm_head at 0.30" in summarize(plan)

    X, dense_logits = _head_inputs(model, IDS)
    sparsify_(model, plan)
    assert isinstance(model.lm_head, RSparseLinear) and HEAD in sparse_modules(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: shared, not copied
    W = model.model.embed_tokens.weight.detach().double()
    X2, logits = _head_inputs(model, IDS)
    keep = X2.abs() * W.norm(dim=0).float().double() > lp.tau
    want = (X2 * keep) @ W.T  # the hand computation: kept channels through their columns, the rest dropped
    torch.testing.assert_close(logits[0].double(), want, rtol=1e-4, atol=1e-3)
    assert (logits[0].double() - X2 @ W.T).abs().max() > 1e-2  # the head really is sparse
    assert 0.5 < keep.double().mean().item() < 0.9
    with dense_view(model):
        assert type(model.lm_head) is torch.nn.Linear
        torch.testing.assert_close(model(IDS).logits, dense_logits)

    with torch.inference_mode(), counting_kept(model, plan.shapes) as real:
        model(IDS)
    assert real["keep"][HEAD] == pytest.approx(keep.double().mean().item(), abs=1e-9)
    read_blocks = (1 - expected_sparsity(real["layers"], plan.shapes)) * blocks
    assert total_sparsity(real["layers"], plan.shapes, plan.head_shape) == pytest.approx(
        1 - (read_blocks + real["keep"][HEAD] * head) / (blocks + head), abs=1e-9)

    d = artifact.save(plan, tmp_path / "p")
    loaded = artifact.load(d)
    assert loaded.layers == plan.layers and loaded.head_shape == plan.head_shape
    m2, _ = smol()
    sparsify_(m2, loaded)
    assert m2.lm_head.tau.item() == model.lm_head.tau.item()
    meta = json.loads((d / "plan.json").read_text())
    del meta["head_shape"], meta["layers"][HEAD]  # a plan written before session 41
    (d / "plan.json").write_text(json.dumps(meta))
    old = artifact.load(d)
    assert old.head_shape == [] and old.expected_total_sparsity() is None and "lm_head" not in summarize(old)


def test_a_dense_head_is_counted_whole(smol, smol_stats):
    model, _ = smol()
    plan = build_plan(model, smol_stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.5))
    blocks, head = sum(o * i for o, i in plan.shapes.values()), 49152 * 576
    assert HEAD not in plan.layers
    assert plan.expected_total_sparsity() == pytest.approx(1 - (0.5 * blocks + head) / (blocks + head), abs=1e-9)
    assert "lm_head dense" in summarize(plan)


def test_refinement_sets_the_head_threshold_on_the_sparse_blocks_output(smol, smol_stats):
    model, _ = smol()
    plan = build_plan(model, smol_stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.5, head_sparsity=0.5))
    plan.layers[HEAD].tau *= 0.25  # off: keeps far more than half
    sparsify_(model, plan)
    torch.manual_seed(1)
    windows = torch.randint(100, 20000, (2, 96))
    refined = refine_thresholds_(model, plan, windows)
    got = measure_sparsity(model, windows, plan.shapes)["keep"][HEAD]
    assert abs(got - 0.5) < 0.02 and refined.layers[HEAD].tau != plan.layers[HEAD].tau
    assert refined.layers[HEAD].tau == model.lm_head.tau.item()


def test_auto_head_puts_the_head_inside_the_budget(smol, smol_stats, tmp_path):
    """head_sparsity='auto' in a table-driven plan: the head and the blocks each at the budget's
    sparsity, so every weight a token reads is at it (bytes by hand); the plan says what its target
    counts, and the config round-trips through the artifact."""
    model, _ = smol()
    plan = build_plan(model, smol_stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.4, head_sparsity="auto"))
    lp = plan.layers[HEAD]
    assert (lp.keep, lp.rank, lp.score) == (pytest.approx(0.6), 0, "wnorm")
    assert lp.tau == pytest.approx(smol_stats.head.hist["wnorm"].quantile(0.4), rel=1e-12)
    blocks, head = sum(o * i for o, i in plan.shapes.values()), 49152 * 576
    assert plan.expected_sparsity() == pytest.approx(0.4, abs=1e-9)
    assert plan.expected_total_sparsity() == pytest.approx(1 - (0.6 * blocks + 0.6 * head) / (blocks + head), abs=1e-9)
    assert "target=0.40 (blocks and lm_head)" in summarize(plan)
    loaded = artifact.load(artifact.save(plan, tmp_path / "p"))
    assert loaded.config["head_sparsity"] == "auto" and loaded.layers == plan.layers
    assert RSparseConfig(**loaded.config).head_share() == 0.4


@pytest.mark.parametrize("kw,match", [
    ({"head_sparsity": 1.0}, "head_sparsity must be in"), ({"head_sparsity": "0.3"}, "head_sparsity must be a number"),
    ({"method": "cats", "head_sparsity": 0.3}, "head_sparsity is for rsparse and teal plans"),
    ({"method": "dense", "head_sparsity": 0.3}, "head_sparsity is for rsparse and teal plans"),
    ({"method": "cats", "head_sparsity": "auto"}, "head_sparsity is for rsparse and teal plans"),
    ({"head_sparsity": "Auto"}, "head_sparsity must be a number in \\[0, 1\\) or 'auto'"),
])
def test_bad_head_config(kw, match):
    with pytest.raises(RSparseError, match=match):
        RSparseConfig(**kw)


def test_statistics_without_the_head_are_refused_by_name(smol, smol_stats):
    model, _ = smol()
    stats = dataclasses.replace(smol_stats, head=None)  # as collected before session 41
    with pytest.raises(RSparseError, match="no lm_head histogram"):
        build_plan(model, stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.5, head_sparsity=0.2))


def test_cli_refuses_a_bad_head_sparsity(capsys):
    from rsparse.cli import main

    assert main(["eval", "--method", "teal", "--head-sparsity", "1.5", "--dataset", "wiki"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(lines) == 1 and "head_sparsity must be in [0, 1)" in lines[0]
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", "x", "--head-sparsity", "half"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(lines) == 1 and "--head-sparsity: a byte sparsity in [0, 1) or 'auto', got 'half'" in lines[0]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backends_swap_the_head_and_decode_as_the_oracle(tiny_llama, backend):
    """The fast backends take the sparse head like any projection; the lean decoder, one token per step,
    gives the logits the oracle model gives for the same prefix."""
    from rsparse.decode import StaticDecoder

    torch.manual_seed(5)
    model = tiny_llama()
    torch.manual_seed(5)
    oracle = tiny_llama()  # the same weights
    windows = torch.randint(0, 50, (4, 24))
    stats = collect(model, windows, sample_tokens=32, scores=(), ranks=(0,), progress=False)
    plan = build_plan(model, stats, RSparseConfig(method="teal", allocation="uniform", sparsity=0.5, head_sparsity=0.4))
    sparsify_(model, plan)
    sparsify_(oracle, plan)
    if backend == "cpp":
        from rsparse.kernels.cpu import CpuRSparseLinear, to_cpu_backend_

        to_cpu_backend_(model)
        assert isinstance(model.lm_head, CpuRSparseLinear)
    else:
        pytest.importorskip("triton")
        from rsparse.kernels.module import TritonRSparseLinear, to_triton_

        to_triton_(model)
        assert isinstance(model.lm_head, TritonRSparseLinear)
    ids = torch.randint(0, 50, (1, 6))
    dec = StaticDecoder(model, 16)
    for t in range(ids.shape[1]):
        got = dec.forward(ids[:, t : t + 1])
        with torch.inference_mode():
            want = oracle(ids[:, : t + 1]).logits[:, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
