"""End-to-end GPU decode benchmark: the same as `rsparse bench --device cuda` (src/rsparse/gpubench.py),
with the same flags, e.g. `python3 benchmarks/gpu_decode.py --shapes llama3-8b --batches 1,2 --tuned F`."""
import sys

from rsparse.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--device", "cuda", *sys.argv[1:]]))
