"""The user-facing API: pipelines, sessions, samplers — and their errors."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

import crcm
from crcm.errors import ConfigError, InvalidStateError, PagesExhaustedError
from crcm.pipeline import Pipeline, load
from crcm.runtime import Runtime, generate
from crcm.sampling import (
    SamplerConfig,
    consistency_times,
    euler_times,
    get_preset,
    self_forcing_times,
)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config("tiny", seed=0, action_names=("noop", "fire", "right", "left"))


# -- samplers ---------------------------------------------------------------------------------


def test_self_forcing_times_are_the_warped_release_list():
    # s' = 5s/(1+4s) at s = 1, 0.75, 0.5, 0.25, in float32 as that release computes them.
    expected = [1.0, 3.75 / 4, 2.5 / 3, 1.25 / 2]
    np.testing.assert_allclose(self_forcing_times(), expected, rtol=1e-6)
    preset = get_preset("self-forcing")
    assert preset.chunk_frames == 3 and preset.steps_per_chunk == (4,)
    assert preset.cache_update  # the clean t = 0 pass after every chunk


def test_default_consistency_times():
    assert consistency_times(4) == [1600 / 1601, 15 / 16, 5 / 6, 5 / 8]
    assert consistency_times(2) == consistency_times(4)[:2]
    with pytest.raises(ConfigError):
        consistency_times(5)


def test_euler_times_are_decreasing_and_shifted():
    t = euler_times(16, shift=5.0)
    assert t[0] == 1.0 and all(a > b > 0 for a, b in itertools.pairwise(t))
    assert euler_times(4, shift=1.0) == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps_per_chunk": ()}, "steps_per_chunk"),
        ({"steps_per_chunk": (5,)}, "times given"),
        ({"times": (0.5, 0.9)}, "strictly decreasing"),
        ({"chunk_frames": 0}, "chunk_frames"),
        ({"cfg_scale": 3.0}, "Euler sampling only"),
        ({"kind": "ddim"}, "kind"),
    ],
)
def test_invalid_sampler_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SamplerConfig(**kwargs)


# -- pipelines --------------------------------------------------------------------------------


def test_pipeline_save_load_round_trip(pipe, tmp_path):
    folder = pipe.save(tmp_path / "m")
    loaded = load(folder)
    assert loaded.action_names == pipe.action_names and loaded.sampler == pipe.sampler
    x = torch.randn(1, 2, *pipe.latent_chw)
    s = torch.rand(1, 2)
    with torch.no_grad():
        assert torch.equal(pipe.model(x, s), loaded.model(x, s))
    assert not list(tmp_path.glob("m/.*"))  # atomic writes leave no temporary files


def test_load_errors_are_clear(pipe, tmp_path):
    with pytest.raises(ConfigError, match="neither a pipeline folder"):
        load(tmp_path / "missing")
    folder = pipe.save(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        load(folder)
    meta = json.loads((folder / "crcm.json").read_text())
    meta["model"]["dim"] = 48
    (folder / "crcm.json").write_text(json.dumps(meta))
    pipe.save(tmp_path / "ok")
    (folder / "model.safetensors").write_bytes((tmp_path / "ok/model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="saved from another config"):
        load(folder)
    meta["version"] = 99
    (folder / "crcm.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="version"):
        load(folder)


def test_crcm_load_is_exported():
    assert crcm.load is load
    with pytest.raises(ConfigError, match="shipped"):
        crcm.load("no-such-model")


# -- sessions ---------------------------------------------------------------------------------


def test_session_errors(pipe):
    rt = Runtime(pipe, max_streams=1)
    s = rt.open(seed=0)
    with pytest.raises(ConfigError, match="unknown action"):
        s.push_actions(["jump"])
    with pytest.raises(ConfigError, match=r"int in \[0, 4\)"):
        s.push_actions([7])
    with pytest.raises(ConfigError, match="sequence"):
        s.push_actions(1)
    with pytest.raises(ConfigError, match="class condition"):
        rt.open(cond=17)
    with pytest.raises(PagesExhaustedError):
        rt.open(seed=1)  # one stream's worth of pages, already taken
    s.close()
    with pytest.raises(InvalidStateError, match="closed"):
        s.push_actions([0])
    rt.open(seed=2).close()  # pages came back


def test_actions_by_name_and_frames_iterator(pipe):
    rt = Runtime(pipe, max_streams=2)
    s = rt.open(seed=0)
    s.push_actions(["noop", "left", 2])
    frames = list(s.frames())
    assert len(frames) == 3 and frames[0].shape == (16, 16, 1) and frames[0].dtype == np.uint8


def test_blocking_buffer_pauses_the_stream_instead_of_losing_frames(pipe):
    rt = Runtime(pipe, max_streams=1)
    s = rt.open(seed=0, buffer_frames=2)
    s.push_actions([0] * 5)
    rt.run_until_idle()
    assert len(s.buffer) == 2 and s.stats()["dropped"] == 0  # paused at a full buffer
    assert len(s.read()) == 2
    rt.run_until_idle()
    assert len(s.read()) == 2
    rt.run_until_idle()
    assert len(s.read()) == 1 and s.stats()["frames_emitted"] == 5


def test_background_runtime_serves_sessions(pipe):
    with Runtime(pipe, max_streams=2) as rt:
        rt.start()
        s = rt.open(seed=0)
        s.push_actions([1, 2, 3])
        got = [s.pop(timeout=30.0) for _ in range(3)]
        assert [item[1] for item in got] == [0, 1, 2]
    assert not rt.running and s.closed


def test_generate_validates_and_yields_frames(pipe):
    with pytest.raises(ConfigError, match="needs 4 actions"):
        list(generate(pipe, 4, actions=[0]))
    frames = list(generate(pipe, 4, actions=[0, 1, 2, 3], steps=2, seed=1))
    again = list(generate(pipe, 4, actions=[0, 1, 2, 3], steps=2, seed=1))
    assert len(frames) == 4
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))


def test_generate_begins_on_the_shipped_games_opening_frames():
    """The shipped Breakout model was trained on game frames: from no context it draws noise.
    ``generate`` begins on its opening frames, as ``crcm play`` does, so the paddle is there
    from the first yielded frame and follows the keys; the opening frames are not yielded."""
    from crcm.eval.breakout import BreakoutDetector

    breakout = load("breakout")
    detector = BreakoutDetector(breakout.frame_shape[:2])
    actions = ["FIRE"] + ["RIGHT"] * 8 + ["LEFT"] * 8
    frames = list(generate(breakout, len(actions), actions=actions, seed=0))
    assert len(frames) == len(actions)
    opening = set(map(bytes, breakout.start_frames))
    assert not any(bytes(f) in opening for f in frames)  # every frame yielded is generated
    paddle = [detector.paddle_x(f) for f in frames]
    assert None not in paddle, paddle
    assert paddle[8] > paddle[0] + 20 and paddle[16] < paddle[8] - 20, paddle  # → then ←
    blind = list(generate(breakout, 4, actions=actions, seed=0, opening_frames=False))
    assert sum(detector.paddle_x(f) is None for f in blind) >= 3  # the reason for the default


def test_pipeline_from_wan_named_checkpoint_streams_with_the_self_forcing_preset(tmp_path):
    """A checkpoint in the original Wan naming, wrapped like a Self-Forcing release, loads and
    streams c3-3 with the release's sampler on crcm's runtime: chunks of 3 frames, 4 steps at
    the release's warped times 1000/750/500/250 → s' = 5s/(1 + 4s), a clean cache-update pass
    after every chunk, written out here rather than taken from get_preset."""
    from safetensors.torch import save_file

    from crcm.models import CausalDiT, get_config
    from crcm.models.wan_weights import convert_state_dict

    cfg = get_config("tiny").replace(
        cond="text", text_dim=8, text_len=4, num_classes=0, class_tokens=0, num_actions=0
    )
    source = CausalDiT(cfg)
    with torch.no_grad():  # a non-zero output head, so that frames depend on the sampler
        source.head.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    wan = convert_state_dict(source.state_dict(), src="crcm", dst="wan")
    wan = {f"generator_ema.model.{k}": v.contiguous() for k, v in wan.items()}
    save_file(wan, tmp_path / "release.safetensors")

    pipe = Pipeline.from_checkpoint(
        tmp_path / "release.safetensors", config=cfg, prefix="generator_ema."
    )
    for name, tensor in source.state_dict().items():
        if not name.startswith("null_text"):  # crcm-only: not in Wan checkpoints
            assert torch.equal(pipe.model.state_dict()[name], tensor), name
    release = SamplerConfig(
        kind="consistency",
        chunk_frames=3,
        steps_per_chunk=(4,),
        times=(1.0, 0.9375, 5 / 6, 0.625),
        cache_update=True,
    )
    got = pipe.sampler
    assert (got.kind, got.chunk_frames, got.steps_per_chunk, got.cache_update) == (
        "consistency", 3, (4,), True,
    )  # fmt: skip
    np.testing.assert_allclose(got.times, release.times, rtol=1e-6)

    def frames(sampler):
        rt = Runtime(pipe, max_streams=1, context_frames=9)
        chunks = []
        run_group = rt.executor._run_group

        def recording(plan, items, T):
            chunks.append(T)
            run_group(plan, items, T)

        rt.executor._run_group = recording
        text = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        session = rt.open(sampler=sampler, cond=text, seed=0, max_frames=6)
        rt.run_until_idle()
        return session.read(), chunks

    streamed, chunks = frames(None)  # the pipeline's default sampler
    assert len(streamed) == 6 and set(chunks) == {3}  # c3-3: every forward is a 3-frame chunk
    assert len(chunks) == 2 * (4 + 1)  # 2 chunks × (4 steps + the clean cache-update pass)
    expected, _ = frames(release)
    assert all(np.array_equal(a, b) for a, b in zip(streamed, expected, strict=True))
    other, _ = frames(dataclasses.replace(release, steps_per_chunk=(2,)))
    assert not all(np.array_equal(a, b) for a, b in zip(streamed, other, strict=True))
    # The same weights as the releases ship them (.pt, read with weights_only=True only).
    nested = {k.removeprefix("generator_ema."): v for k, v in wan.items()}  # model.…
    torch.save({"generator_ema": nested, "step": 100}, tmp_path / "release.pt")
    from_pt = Pipeline.from_checkpoint(tmp_path / "release.pt", config=cfg)
    for name, tensor in pipe.model.state_dict().items():
        assert torch.equal(from_pt.model.state_dict()[name], tensor), name
    torch.save({"generator_ema": dataclasses.replace(release)}, tmp_path / "object.pt")
    with pytest.raises(ConfigError, match="never unpickles"):
        Pipeline.from_checkpoint(tmp_path / "object.pt", config=cfg)


def test_a_failing_plan_ends_its_sessions_and_the_loop_serves_on(pipe):
    rt = Runtime(pipe, max_streams=2)
    good, bad = rt.open(seed=0), rt.open(seed=1)
    original = rt.executor._run_group

    def flaky(plan, items, T):  # the model fails for the bad stream's plans only
        if bad.id in plan.stream_ids.tolist():
            raise RuntimeError("simulated device error")
        original(plan, items, T)

    rt.executor._run_group = flaky
    bad.push_actions([0])
    with pytest.raises(RuntimeError, match="simulated"):
        rt.step()
    assert bad.closed and isinstance(bad.error, RuntimeError)
    assert rt.stats()["streams"] == 1
    rt.start()
    good.push_actions([1, 2])
    assert [good.pop(timeout=30.0)[1] for _ in range(2)] == [0, 1]
    rt.close()
