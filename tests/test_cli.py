"""The command line end to end: calibrate -> eval --plan -> generate, and one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run(*args):
    return subprocess.run([sys.executable, "-m", "rsparse", *args], capture_output=True, text=True, timeout=900)


def test_calibrate_eval_generate(tmp_path, capsys):
    # TEAL's uniform plan (rank 0, histograms alone): the commands without minutes of error tables and SVDs;
    # R-Sparse plans with rank terms are calibrated, saved, loaded and evaluated by the main job's test below
    # and by test_plan_apply.py, greedy TEAL by the evo search's CLI test and test_calibrate.py.
    # calibrate through the entry point (a subprocess), eval, generate and plot-plan in this process
    # (~10 s of imports each saved)
    from rsparse.cli import main

    out = tmp_path / "plan"
    r = run("calibrate", "--method", "teal", "--sparsity", "0.5", "--calib-tokens", "1024", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "plan.json").is_file() and not list(out.glob(".*"))  # no temporary files left
    capsys.readouterr()
    assert main(["eval", "--plan", str(out), "--dataset", "wiki", "--windows", "1", "--length", "256",
                 "--tasks", "piqa", "--limit", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "teal" and res["tokens"] == 255 and 1 < res["ppl"] < 1000
    assert abs(res["sparsity_expected"] - 0.5) < 0.01 and set(res["tasks"]["piqa"]) == {"acc", "acc_norm", "n"}
    assert res["plan"]["refine_tokens"] == 1024  # thresholds refined on the calibration's tokens by default
    assert abs(res["sparsity_realized"] - 0.5) < 0.1  # counted on the 255 scored tokens themselves
    assert main(["generate", "--plan", str(out), "--max-new-tokens", "5", "Hello"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["plot-plan", str(out), "--out", str(tmp_path / "heat.png")]) == 0
    assert (tmp_path / "heat.png").stat().st_size > 1000


def _evo_args(out):
    # TEAL's space (rank 0): the CLI path without minutes of SVDs; the rank path is tested in test_search.py
    return ["calibrate", "--search", "evo", "--method", "teal", "--sparsity", "0.5", "--calib-tokens", "1024", "--population", "2",
            "--generations", "1", "--groups", "1", "--fitness-tokens", "512", "--val-tokens", "512", "--no-baselines",
            "--out", str(out)]


def _evo_plan(out):
    r = run(*_evo_args(out))
    assert r.returncode == 0, r.stderr
    assert (out / "plan.json").is_file() and (out / "search.log").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["config"]["allocation"] == "evo" and abs(plan["expected_sparsity"] - 0.5) < 0.005
    return plan


@pytest.mark.slow  # ~100 s; the search, its resume and its refusals are tested through the API in test_search.py
def test_calibrate_search_evo_then_refuses_other_settings(tmp_path):
    out = tmp_path / "evo"
    _evo_plan(out)
    args = _evo_args(out)
    r = run(*[a if a != "2" else "3" for a in args])
    assert r.returncode == 2 and "other settings" in r.stderr
    r = run(*args, "--fitness", "ce")  # another objective is another search: refused before calibrating
    assert r.returncode == 2 and "other settings" in r.stderr


@pytest.mark.slow  # a second full CLI run (~2 min); resuming is tested through the API in test_search.py
def test_calibrate_search_evo_rerun_gives_the_same_plan(tmp_path):
    out = tmp_path / "evo"
    plan = _evo_plan(out)
    r = run(*_evo_args(out))  # finished search: the same plan again, no new evaluations
    assert r.returncode == 0 and json.loads((out / "plan.json").read_text())["layers"] == plan["layers"]


@pytest.mark.parametrize("args,msg", [
    (["eval", "--model", "nope"], "unknown model"),
    (["eval", "--tasks", "piqa,foo"], "unknown task 'foo'"),
    (["eval", "--text", "/no/such/file.txt"], "neither a file"),
    (["eval", "--method", "teal", "--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["eval", "--plan", "/no/such/dir", "--dataset", "wiki"], "no plan.json"),
    (["calibrate", "--method", "dense", "--out", "/tmp/x"], "nothing to calibrate"),
    (["eval", "--windows", "0", "--dataset", "wiki"], "at least 1"),
    (["run", "--length", "0"], "--length must be at least 1"),
    (["run", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["calibrate", "--search", "evo", "--population", "1", "--out", "/tmp/x"], "population must be at least 2"),
    (["calibrate", "--allocation", "evo", "--out", "/tmp/never-written"], "evo allocations come from the search"),
    (["eval", "--method", "rsparse", "--allocation", "evo", "--dataset", "wiki"], "evo allocations come from the search"),
    (["plot-plan", "/no/such/dir"], "no plan.json"),
    (["bench", "--device", "tpu"], "unknown --device 'tpu'"),
    (["bench", "--batches", "2"], "decodes batch 1"),
    (["bench", "--device", "cuda", "--shapes", "gpt9"], "unknown --shapes ['gpt9']"),
    (["bench", "--device", "cuda", "--batches", "1,16"], "--batches must be 1..8"),
    (["bench", "--device", "cuda", "--tuned", "/no/such.json"], "no such file"),
    (["bench", "--device", "cuda", "--tuned", str(Path(__file__).resolve().parents[1] / "README.md")], "not a kernel-configuration file"),
    (["bench", "--device", "cuda", "--batches", "one"], "--batches is a comma list of numbers"),
    (["bench", "--device", "cuda", "--sparsities", "0.5,1"], "--sparsities must lie in (0, 1)"),
    (["bench", "--sparsities", "0.5,abc"], "--sparsities is a comma list of numbers"),
    (["bench", "--sparsities", "0"], "--sparsities must lie in (0, 1)"),
    (["bench", "--device", "cuda", "--alpha", "0.9"], "give one --sparsities value"),
    (["bench", "--device", "cuda", "--alpha", "1.5", "--sparsities", "0.5"], "--alpha must be in (0, 1]"),
    (["bench", "--device", "cuda", "--alpha", "0.9", "--sparsities", "0.5", "--compare-rank", "gather,fast"], "unknown rank mode(s) ['fast']"),
    (["bench", "--device", "cuda", "--compare-rank", "gather"], "give --alpha < 1 too"),
    (["bench", "--device", "cuda", "--rank-ab", "ZCHUNK_WIDE=256"], "give --alpha < 1 too"),
    (["bench", "--device", "cuda", "--compare-attention", "flash"], "--compare-attention: unknown attention 'flash'"),
    (["bench", "--device", "cuda", "--alpha", "0.9", "--sparsities", "0.5", "--rank-ab", "ZCHUNK_WIDE=100"],
     "ZCHUNK_WIDE must be 0 or a power of two >= 16, got 100"),
    (["bench", "--device", "cuda", "--hf-reference", "eager,graph"], "--hf-reference: unknown mode(s) ['graph']"),
    (["bench", "--device", "cuda", "--inductor-ab", "no_such_knob=1"], "inductor has no option 'no_such_knob'"),
    (["bench", "--device", "cuda", "--retune", "0"], "--retune must be 1..4"),
    (["bench", "--device", "cuda", "--compare-gather", "1,0"], "--compare-gather takes a comma list of 256-channel chunks"),
    (["bench", "--device", "cuda", "--compare-gather", "1g4"], "each 1..64, got '1g4'"),
    (["bench", "--device", "cuda", "--dtype", "float32"], "runs bfloat16 or float16 weights, got --dtype 'float32'"),
    (["generate", "--device", "tpu", "Hi"], "--device must be cpu or cuda"),
    (["calibrate", "--rank-cost", "0.5", "--out", "/tmp/never-written"], "rank_cost must be a finite number >= 1"),
    (["calibrate", "--refine-tokens", "-5", "--out", "/tmp/never-written"], "--refine-tokens must be >= 0"),
    (["eval", "--method", "rsparse", "--target", "gpu", "--rank-multiple", "0"], "rank_multiple must be a whole number >= 1"),
    (["generate", "--plan", "/no/such/plan", "--backend", "oracle", "--compile", "Hi"], "it needs --backend cpp, not oracle"),
])
def test_bad_input_one_line_exit_2(args, msg, capsys):
    """In this process (a subprocess per case cost ~5 s of imports each, ~2 min of CI); the entry
    point itself is exercised by the subprocess tests around this one."""
    from rsparse.cli import main

    try:
        code = main(args)
    except SystemExit as e:  # argparse's errors (_Parser.error)
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and msg in lines[0], err


@pytest.mark.parametrize("flags,want", [([], (1, 1.0, 0.0)), (["--target", "gpu"], (16, 3.0, 0.1)),
                                         (["--target", "gpu", "--min-keep", "0"], (16, 3.0, 0.0)),
                                         (["--target", "gpu", "--rank-cost", "2"], (16, 2.0, 0.1)),
                                         (["--min-keep", "0.2"], (1, 1.0, 0.2))])
def test_target_sets_the_rank_rule_and_floor_unless_given(flags, want):
    """The config a calibrating command builds: --target's rank rule and keep floor, each overridden
    by its own flag (0 included: an explicit --min-keep 0 removes the gpu target's floor)."""
    from rsparse.cli import _config, build_parser

    cfg = _config(build_parser().parse_args(["calibrate", "--out", "unused", *flags]))
    assert (cfg.rank_multiple, cfg.rank_cost, cfg.min_keep) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this starts the real benchmark")
def test_gpu_bench_without_a_gpu_says_so():
    r = run("bench", "--device", "cuda")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine these run")
def test_gpu_generate_without_a_gpu_says_so():
    r = run("generate", "--device", "cuda", "--backend", "triton", "Hi")
    assert r.returncode == 2 and "no CUDA GPU is visible" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "rsparse", "generate", "--plan", "/no/such/dir", "--backend", "triton", "Hi"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "runs on --device cuda" in r.stderr, r.stderr
    r = run("generate", "--gather", "cuda", "Hi")
    assert r.returncode == 2 and "--gather cuda is the compiled GPU step's gather" in r.stderr, r.stderr


@pytest.mark.slow  # ~55 s here; `gpu_checks.sh cli` runs the same setup on the GPU, and the Triton backend's
# decode against the oracle runs in the fast set on the CPU (test_head.py, test_families.py, test_kernels.py)
def test_generate_with_the_triton_backend_on_a_model_directory(tmp_path):
    """A Llama saved as a Hugging Face directory (random, 2 layers, the bundled tokenizer) and a plan
    with rank terms, made by `benchmarks/gpu_generate_check.py prepare` (the GPU check's own setup);
    `generate --backend triton` (Triton's interpreter here, CUDA graphs on a GPU) writes the oracle
    backend's text."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_generate_check.py"
    r = subprocess.run([sys.executable, str(script), "prepare", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    model = ["--model", str(tmp_path / "model")]
    device = ["--device", "cuda"] if torch.cuda.is_available() else []
    texts = [run("generate", *model, "--plan", str(tmp_path / "plan"), "--backend", b, *device, "--max-new-tokens", "6", "The")
             for b in ("oracle", "triton")]
    assert all(t.returncode == 0 for t in texts), [t.stderr for t in texts]
    assert texts[1].stdout == texts[0].stdout and texts[0].stdout.strip()
    assert "triton: 14 projections, 4 fused groups" in texts[1].stderr, texts[1].stderr


def test_empty_text_file_one_line_exit_2(tmp_path, capsys):
    from rsparse.cli import main

    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    assert main(["eval", "--text", str(f)]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(lines) == 1 and "empty" in lines[0], lines


def test_main_job_compares_dense_teal_and_rsparse(tmp_path, monkeypatch, capsys, smol_stats):
    """`rsparse run`, the README's main job, end to end on small settings (its plans cached under a
    temporary directory): three rows in order, each plan's measured sparsity near its target, and
    sparsity costing some perplexity but not most of the model. Its one calibration pass is the
    session's shared statistics (`smol_stats`, the same `observe` on 2048 tokens): a second pass of
    its own cost ~75 s of CI; the fake checks what the job asks for."""
    import importlib

    from rsparse.cli import main

    run_mod = importlib.import_module("rsparse.run")
    monkeypatch.setattr(run_mod, "cache_dir", lambda: tmp_path)
    asked = []

    def observe(model, tok, tokens, scores):
        asked.append((tokens, scores))
        # as many tokens as asked for, so the plans are refined on them (512) as the real job's would be
        return dataclasses.replace(smol_stats, tokens=tokens)

    monkeypatch.setattr(run_mod, "observe", observe)
    assert main(["run", "--calib-tokens", "512", "--windows", "1", "--length", "256", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    dense, teal, rs = rows
    assert [r["method"] for r in rows] == ["dense", "teal", "rsparse"]
    assert dense["realized"] == 0.0 and abs(teal["realized"] - 0.5) < 0.08 and abs(rs["realized"] - 0.5) < 0.08, rows
    for r in (teal, rs):
        assert dense["ppl_wiki"] < r["ppl_wiki"] < 3 * dense["ppl_wiki"], rows
        assert all(0.0 <= r[t] <= 1.0 for t in ("piqa", "arc_easy", "winogrande"))
    assert asked == [(512, ("abs",))]  # one pass, shared by both plans
    assert len(list((tmp_path / "plans").iterdir())) == 3  # the next run loads them instead of calibrating
    assert "R-Sparse at 50% (greedy): Photosynthesis" in out
