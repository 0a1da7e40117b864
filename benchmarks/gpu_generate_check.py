"""`rsparse generate --device cuda` end to end on a small saved model (the GPU machine cannot reach
the bundled model, and a run carries at most 64 MiB).

    python benchmarks/gpu_generate_check.py prepare DIR   # CPU: a random 2-layer Llama with the bundled
                                                          # tokenizer, saved to DIR/model, and a plan
                                                          # with rank terms in DIR/plan
    python benchmarks/gpu_generate_check.py run DIR       # GPU: the CLI per dtype and backend; prints a
                                                          # table and one JSON line ($OUT/gpu_generate_check.json)

Use DIR = gpu_check (git-ignored): a device run then carries it whole (`carry: ["gpu_check"]`), the
model's and the plan's *.safetensors included (a run 7 in session 11 lost the plan factors that way).
Each generation is compared with the eager oracle backend's text on the same device and dtype.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = [("oracle", []), ("triton", []), ("triton", ["--compile"])]


def prepare(d: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsparse.models import load

    _, tok = load("smollm2-135m")
    torch.manual_seed(0)
    # widths that give every projection a rank term under a uniform alpha of 0.5 (ranks are stored in
    # multiples of 16: at 64 wide they round to 0); tied embeddings keep the file small
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    subprocess.run([sys.executable, "-m", "rsparse", "calibrate", "--model", str(d / "model"), "--sparsity", "0.5",
                    "--calib-tokens", "1024", "--allocation", "uniform", "--alpha", "0.5", "--out", str(d / "plan")], check=True)
    ranks = {name: layer["rank"] for name, layer in json.loads((d / "plan" / "plan.json").read_text())["layers"].items()}
    if not all(ranks.values()):
        sys.exit(f"the plan should give every projection a rank term: {ranks}")
    print(f"prepared {d}: carry {sorted(str(p) for p in d.rglob('*.safetensors'))}")


def _line(r: dict) -> str:
    return f"{r['dtype']:9s} {r['backend']:18s} {r['rc']:3d} {r['seconds']:6.1f}  {r['same_as_oracle']}  {r['stderr_tail']}"


def run(d: Path) -> None:
    rows = []
    print("each case as it ends (a run cut short keeps those):", flush=True)
    for dtype in ("float32", "bfloat16", "float16"):
        texts = {}
        for backend, extra in CASES:
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "rsparse", "generate", "--model", str(d / "model"), "--plan", str(d / "plan"),
                                "--device", "cuda", "--dtype", dtype, "--backend", backend, *extra, "--max-new-tokens", "24", "The"],
                               capture_output=True, text=True, timeout=600)
            label = backend + "".join(extra)
            texts[label] = r.stdout
            rows.append({"dtype": dtype, "backend": label, "rc": r.returncode, "seconds": time.time() - t0,
                         "same_as_oracle": r.stdout == texts["oracle"] and r.returncode == 0,
                         "stderr_tail": r.stderr.strip().splitlines()[-1:] if r.returncode else []})
            print(_line(rows[-1]), flush=True)
    print(f"\n{'dtype':9s} {'backend':18s} {'rc':>3s} {'s':>6s}  same text as oracle")
    for r in rows:
        print(_line(r))
    result = {"rows": rows, "all_same": all(r["same_as_oracle"] for r in rows)}
    if os.environ.get("OUT"):
        from rsparse.atomic import write_json

        write_json(Path(os.environ["OUT"]) / "gpu_generate_check.json", result)
    print(json.dumps({"all_same": result["all_same"]}))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "run"):
        sys.exit(__doc__)
    (prepare if sys.argv[1] == "prepare" else run)(Path(sys.argv[2]))
