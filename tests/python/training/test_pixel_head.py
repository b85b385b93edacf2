"""The pixel head (``DiTConfig.pixel_head``): a full-resolution convolutional correction of an
x0-head's clean-frame estimate, added to a trained model without changing it, trained alone
(``trainable = "pixel_head"``), and run by every path that runs the model (the layer-wise JVP,
the runtime, a saved pipeline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from world_models import WM, check_jvp_against_differences, randomized, stream_and_rollout

from crcm.data.dataset import CollectConfig, collect
from crcm.errors import ConfigError
from crcm.models import CausalDiT
from crcm.models.dit import preceding_frames
from crcm.pipeline import Pipeline, load
from crcm.runtime import Runtime
from crcm.sampling import SamplerConfig
from crcm.training.config import load_config
from crcm.training.trainer import train, with_pixel_head


def inputs(seed: int = 1, B: int = 2, T: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, WM.in_channels, *WM.frame_hw, generator=gen, dtype=torch.float64)
    s = 0.1 + 0.8 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    prev = preceding_frames(torch.randn(x.shape, generator=gen, dtype=x.dtype), WM.prev_frames)
    actions = torch.randint(0, WM.num_actions, (B, T), generator=gen)
    return x, s, {"prev_B_T_C_H_W": prev, "actions_B_T": actions}


def test_a_new_pixel_head_leaves_the_model_unchanged_until_it_learns():
    model = randomized(CausalDiT(WM).double())
    grown = with_pixel_head(model, 8, seed=0).double().eval()
    assert grown.cfg.pixel_head == 8 and model.pixel_head is None
    x, s, kw = inputs()
    torch.testing.assert_close(grown(x, s, **kw), model(x, s, **kw), rtol=0, atol=0)
    # Once its output layer is not zero it corrects the clean-frame estimate x_s − s·v, and
    # reads the action planes.
    randomized(grown.pixel_head)
    x0_model = x - s[..., None, None, None] * model(x, s, **kw)
    x0_grown = x - s[..., None, None, None] * grown(x, s, **kw)
    assert (x0_grown - x0_model).abs().mean() > 1e-2
    other = {**kw, "actions_B_T": (kw["actions_B_T"] + 1) % WM.num_actions}
    assert not torch.allclose(grown(x, s, **other), grown(x, s, **kw))


def test_a_pixel_head_needs_a_clean_frame_estimate():
    with pytest.raises(ValueError, match="pixel_head corrects a clean-frame estimate"):
        WM.replace(prediction="v", pixel_head=8)
    with pytest.raises(ValueError, match="pixel_head=-1"):
        WM.replace(pixel_head=-1)
    with pytest.raises(ConfigError, match="pixel_head must be a width > 0"):
        load_config(None, ["pixel_head=0"], stage="teacher-tf")
    with pytest.raises(ConfigError, match="trains its fake score"):
        load_config(None, ['trainable="pixel_head"', 'teacher="t"'], stage="sf-dmd")


def test_model_jvp_runs_through_the_pixel_head():
    """The layer-wise JVP (TF-sCM's tangent) differentiates the head too: it matches central
    differences of the whole forward."""
    model = randomized(CausalDiT(WM.replace(pixel_head=4)).double())
    x, s, kw = inputs(seed=2, T=4)
    check_jvp_against_differences(model, x, s, **kw)


def test_the_runtime_streams_what_the_rollout_generates_and_a_saved_model_keeps_its_head(
    tmp_path: Path,
):
    base = Pipeline.from_config("tiny", seed=0)
    pipe = Pipeline(
        model=randomized(CausalDiT(WM.replace(pixel_head=4))),
        codec=base.codec,
        sampler=SamplerConfig(chunk_frames=1, window_frames=8),
        action_names=("NOOP", "FIRE", "RIGHT", "LEFT"),
        name="tiny-wm-pixel-head",
    )
    loaded = load(pipe.save(tmp_path / "p"))
    assert loaded.model.cfg.pixel_head == 4
    for name, p in pipe.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], p)
    smp = SamplerConfig(chunk_frames=1, steps_per_chunk=(1,))
    actions = [0, 2, 3, 3, 2]
    frames, expected = stream_and_rollout(loaded, smp, actions)
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
    # The stream runs the head once per generated frame, not in the passes that only write
    # K/V (the clean cache update of each frame); fused, the update rides along in the next
    # frame's forward (one shape per batch size: the head sees its row too).
    for fuse in (False, True):
        head_rows, batch_rows = rows_through_head_and_model(loaded, smp, actions, fuse)
        assert smp.cache_update and len(head_rows) == len(actions)
        assert max(batch_rows) == (2 if fuse else 1)
        assert head_rows == ([1] + [2] * (len(actions) - 1) if fuse else [1] * len(actions))


def rows_through_head_and_model(
    pipe: Pipeline, sampler: SamplerConfig, actions: list[int], fuse: bool
) -> tuple[list[int], list[int]]:
    """Streams ``actions``; the rows of every pixel-head call and of every forward."""
    head_rows: list[int] = []
    hook = pipe.model.pixel_head.register_forward_hook(
        lambda _module, args, _out: head_rows.append(args[0].shape[0])
    )
    rt = Runtime(pipe, max_streams=1, context_frames=8, fuse_cache_update=fuse)
    batch_rows: list[int] = []
    forward = rt.executor._forward

    def counting(x, *args, **kwargs):
        batch_rows.append(x.shape[0])
        return forward(x, *args, **kwargs)

    rt.executor._forward = counting
    try:
        rt.open(sampler=sampler, seed=3, max_frames=len(actions)).push_actions(actions)
        rt.run_until_idle()
    finally:
        hook.remove()
    return head_rows, batch_rows


@pytest.fixture(scope="module")
def breakout_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 1-step Breakout teacher on a few short episodes, and the data overrides it used."""
    tmp = tmp_path_factory.mktemp("pixel-head")
    small = CollectConfig(train_episodes=2, eval_episodes=1, max_steps=24, seed=5)
    data = collect(tmp / "data", small, progress=False)
    common = [
        'model="breakout"',
        "batch_size=2",
        "checkpoint_every=1",
        'data.kind="atari"',
        f'data.path="{data}"',
        "data.frames=3",
    ]
    run = train(
        load_config(None, [f'out="{tmp / "teacher"}"', "steps=1", *common], stage="teacher-tf"),
        progress=False,
    )
    return run, common


def test_training_only_the_pixel_head_keeps_every_other_weight(tmp_path, breakout_run):
    teacher, common = breakout_run
    overrides = [f'init="{teacher}"', "pixel_head=8", 'trainable="pixel_head"', "lr=1e-2"]
    cfg = load_config(
        None, [f'out="{tmp_path / "head"}"', "steps=2", *common, *overrides], stage="teacher-tf"
    )
    before = load(teacher / "pipeline").model.state_dict()
    after = load(train(cfg, progress=False) / "pipeline").model
    assert after.cfg.pixel_head == 8
    for name, p in after.state_dict().items():
        if name.startswith("pixel_head."):
            continue
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    assert after.pixel_head.net[-1].weight.abs().max() > 0  # the head learnt something


def test_training_only_a_missing_pixel_head_is_refused(tmp_path, breakout_run):
    teacher, common = breakout_run
    overrides = [f'out="{tmp_path / "x"}"', f'init="{teacher}"', 'trainable="pixel_head"']
    with pytest.raises(ConfigError, match="needs a model with a pixel head"):
        train(load_config(None, [*overrides, "steps=1", *common], stage="teacher-tf"))
