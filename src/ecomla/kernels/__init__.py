"""GPU kernels (Triton). Imported only where they can run: CUDA tensors and triton installed,
or TRITON_INTERPRET=1 (Triton's CPU interpreter, used by the tests)."""
