"""World-model fidelity against the emulator (design §6): Breakout's detector and metrics
(``crcm.eval.breakout``) and the evaluation runner (``crcm.eval.harness``). See docs/atari.md.
"""

from crcm.eval.breakout import BreakoutDetector, dynamic_mask, psnr, ram_objects, ssim_map
from crcm.eval.harness import (
    CopyLastFrame,
    EvalConfig,
    PipelineModel,
    WorldModel,
    evaluate,
    load_model,
)

__all__ = [
    "BreakoutDetector",
    "CopyLastFrame",
    "EvalConfig",
    "PipelineModel",
    "WorldModel",
    "dynamic_mask",
    "evaluate",
    "load_model",
    "psnr",
    "ram_objects",
    "ssim_map",
]
