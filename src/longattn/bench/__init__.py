"""Benchmarks behind ``longattn bench``: kernels (patterns × lengths × fwd/bwd, anchors in the same process)."""
