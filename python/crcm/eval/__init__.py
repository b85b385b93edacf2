"""World-model fidelity against the emulator (design §6): Breakout's detector and frame metrics
(``crcm.eval.breakout``), the scripted-action and object metrics (``crcm.eval.control``), the
issue-16 targets (``crcm.eval.targets``) and the evaluation runner (``crcm.eval.harness``).
See docs/atari.md.
"""

from crcm.eval.breakout import BreakoutDetector, dynamic_mask, psnr, ram_objects, ssim_map
from crcm.eval.control import MISS_PX, SCRIPTS, scripted_actions
from crcm.eval.harness import (
    CopyLastFrame,
    EvalConfig,
    PipelineModel,
    WorldModel,
    evaluate,
    load_model,
)
from crcm.eval.targets import TARGETS, check_targets, is_action_blind, verdict

__all__ = [
    "MISS_PX",
    "SCRIPTS",
    "TARGETS",
    "BreakoutDetector",
    "CopyLastFrame",
    "EvalConfig",
    "PipelineModel",
    "WorldModel",
    "check_targets",
    "dynamic_mask",
    "evaluate",
    "is_action_blind",
    "load_model",
    "psnr",
    "ram_objects",
    "scripted_actions",
    "ssim_map",
    "verdict",
]
