"""Triton kernels of crcm (installed as ``crcm.kernels``)."""
