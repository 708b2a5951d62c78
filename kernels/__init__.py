"""Kernels of omnicompile: each op's Triton kernels beside its pure-PyTorch reference."""
