"""Triton kernels. They need `triton`: import the submodules directly, the package itself imports none."""
