"""The crcm network: a Wan2.1-style causal diffusion transformer, its configs and weights."""

from crcm.models.configs import CONFIGS, DiTConfig, get_config
from crcm.models.dit import AttnFn, CausalDiT

__all__ = ["CONFIGS", "AttnFn", "CausalDiT", "DiTConfig", "get_config"]
