"""``crcm demo``'s printout: measured numbers against the emulator, never "found the paddle"."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.demo import DemoReport, controllability_check
from crcm.eval.harness import CopyLastFrame


def test_the_demo_check_calls_an_action_blind_model_action_blind() -> None:
    entry = controllability_check(CopyLastFrame(), (64, 64), starts=2)
    assert entry["action_blind"] and entry["control"]["horizons"] == [1, 2, 4, 8, 16]
    report = DemoReport(
        model="copy",
        streams=1,
        frames=4,
        seconds=0.5,
        latency_ms_p50=1.0,
        latency_ms_p99=2.0,
        steps=(1,),
        max_pages_used=3,
        pages_capacity=8,
        frames_by_stream={0: np.zeros((4, 64, 64, 3), np.uint8)},
        check=entry,
        check_starts=2,
        check_seconds=1.0,
    )
    text = report.summary()
    assert "the model is action-blind" in text
    assert "from 2 held-out starts" in text and "shuffled actions" in text
    assert "found the paddle" not in text and "autopilot found" not in text
    # Without the check there is no claim about the frames at all.
    report.check = None
    assert "paddle" not in report.summary()
