"""Fast decode backends for RSparseLinear. Triton kernels (GPU, or the CPU interpreter under
TRITON_INTERPRET=1) live in `triton_gemv`; import it only where triton is installed."""
