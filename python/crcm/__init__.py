"""crcm: real-time autoregressive video diffusion."""
