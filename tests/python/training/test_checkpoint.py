"""Checkpoints restore everything: N steps straight = N/2 + save/restore + N/2, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from crcm.errors import ConfigError
from crcm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    ema = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    return model, ema, opt


def train(model, ema, opt, steps):
    for _ in range(steps):
        x = torch.randn(16, 4)  # data and dropout-like randomness come from the global RNGs
        noise = random.random()
        loss = ((model(x) - x[:, :2] * noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 0.1)


def test_resume_is_exact(tmp_path):
    random.seed(1)
    straight = make()
    train(*straight, 6)

    random.seed(1)
    model, ema, opt = make()
    train(model, ema, opt, 3)
    save_checkpoint(tmp_path, 3, {"student": model, "ema": ema}, {"student": opt}, {"a": 1})
    train(model, ema, opt, 2)  # progress after the checkpoint is thrown away by the restore

    resumed = make()
    state = load_checkpoint(
        latest_checkpoint(tmp_path),
        {"student": resumed[0], "ema": resumed[1]},
        {"student": resumed[2]},
    )
    assert state.step == 3 and state.extra == {"a": 1}
    train(*resumed, 3)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight[1].parameters(), resumed[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_keeps_the_newest_and_refuses_mismatches(tmp_path):
    model, _, opt = make()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"student": model}, {"student": opt}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    other = torch.nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="does not match"):
        load_checkpoint(latest_checkpoint(tmp_path), {"student": other}, {})
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009")
    with pytest.raises(ConfigError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing-here") is None
