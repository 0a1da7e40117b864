#!/usr/bin/env bash
# One device run of the checks every GPU session repeats, each under its own time limit, results in $OUT:
#   1. the Triton tests on the GPU (gpu_pytest.log; its last line is pytest's own exit status),
#   1b. `ranked`: the rank terms' one-launch gathers on the GPU (gpu_pytest_ranked.log; ~100 s, session 28;
#      not in the default list: `tests` with them passed the 330 s a run leaves it, session 28),
#   2. the per-kernel profile of the dense and 50% sparse steps (gpu_profile.json / .log),
#   3. the CLI in three dtypes x three backends (gpu_generate_check.json / .log; needs gpu_check carried,
#      made on the CPU by `python3 benchmarks/gpu_generate_check.py prepare gpu_check`),
#   3b. `families`: every model family's decode loops against its own forward, on the GPU's Triton kernels
#      (gpu_pytest_families.log; tests/test_families.py, session 39; not in the default list),
#   4. `cuda`: the CUDA C++ gather's tests (gpu_pytest_cuda.log; nvcc builds it first, ~60 s; ~150 s in all,
#      session 33, before the oracle cases doubled for chunks 1 and 3 in session 34; not in the default list).
# Usage on the device machine (the run tool, carry ["gpu_check"], timeout 600):
#   bash benchmarks/gpu_checks.sh [tests|ranked|profile|cli|families|cuda ...]   (default: all three, up to 810 s together, past one
#   600 s run: run `tests` alone (~250 s, session 24) and `profile cli` in a second run)
set -u
export PYTHONPATH="$PWD/src:$PWD/benchmarks"
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests profile cli)
for step in "${steps[@]}"; do
  start=$(date +%s)
  case "$step" in
    tests)
      timeout 330 python -m pytest -q -p no:warnings tests/test_attention.py tests/test_rmsnorm.py \
        tests/test_kernels.py -k "attention or rms or fused_groups_in_decoder or trace_as or split3 or registered_op or group_kernel or glu_kernel" \
        > "$OUT/gpu_pytest.log" 2>&1
      echo "pytest exit status $?" >> "$OUT/gpu_pytest.log"
      tail -3 "$OUT/gpu_pytest.log" ;;
    ranked)
      timeout 200 python -m pytest -q -p no:warnings tests/test_kernels.py \
        -k "partials or wide_calls or (gemv_matches and launch)" > "$OUT/gpu_pytest_ranked.log" 2>&1
      echo "pytest exit status $?" >> "$OUT/gpu_pytest_ranked.log"
      tail -3 "$OUT/gpu_pytest_ranked.log" ;;
    profile)
      timeout 260 python -m rsparse bench --device cuda --shapes llama3-8b --sparsities 0.5 --profile \
        --out "$OUT/gpu_profile.json" > "$OUT/gpu_profile.log" 2>&1
      echo "profile exit status $?"
      grep -E "launches" "$OUT/gpu_profile.log" ;;
    cli)
      timeout 220 python benchmarks/gpu_generate_check.py run gpu_check > "$OUT/gpu_generate_check.log" 2>&1
      echo "cli check exit status $?"
      tail -11 "$OUT/gpu_generate_check.log" ;;
    families)
      timeout 200 python -m pytest -q -p no:warnings tests/test_families.py > "$OUT/gpu_pytest_families.log" 2>&1
      echo "pytest exit status $?" >> "$OUT/gpu_pytest_families.log"
      tail -3 "$OUT/gpu_pytest_families.log" ;;
    cuda)
      timeout 260 python -m pytest -q -p no:warnings -p no:logging tests/test_cuda_gather.py > "$OUT/gpu_pytest_cuda.log" 2>&1
      echo "pytest exit status $?" >> "$OUT/gpu_pytest_cuda.log"
      tail -3 "$OUT/gpu_pytest_cuda.log" ;;
    *)
      echo "unknown step $step (tests, ranked, profile, cli, families, cuda)"; exit 2 ;;
  esac
  echo "$step took $(( $(date +%s) - start )) s"
done
