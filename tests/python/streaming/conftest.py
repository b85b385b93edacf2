"""Shared fixtures of the streaming tests."""

from __future__ import annotations

import pytest
import torch

from crcm.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    """The tiny class- and action-conditioned model with every weight random."""
    pipe = Pipeline.from_config("tiny", seed=0)
    # Zero-initialised output heads make an untrained model output 0: give it real weights.
    with torch.no_grad():
        for p in pipe.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return pipe
