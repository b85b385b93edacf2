"""``crcm stream``: MP4s of rollouts, decoded back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

av = pytest.importorskip("av")

import crcm  # noqa: E402
from crcm.cli import main  # noqa: E402
from crcm.errors import ConfigError  # noqa: E402
from crcm.models import get_config  # noqa: E402
from crcm.stream import parse_actions, read_action_file, write_video  # noqa: E402

ACTIONS = ("NOOP", "FIRE", "RIGHT", "LEFT")


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def world():
    return crcm.Pipeline.from_config("tiny", action_names=ACTIONS)


def test_world_model_video_has_every_frame_at_size(world, tmp_path):
    out = tmp_path / "play.mp4"
    actions = [0, 1, 2, 3] * 4
    result = write_video(world, out, 13, actions=actions, seed=3, scale=2, progress=False)
    assert (result.frames, result.width, result.height) == (13, 32, 32)
    video = _decode(out)
    assert video.shape == (13, 32, 32, 3)
    # The encoded frames are the generated ones (upscaled, gray → RGB), up to H.264 loss.
    expected = list(crcm.generate(world, 13, actions=actions, seed=3))
    for got, want in zip(video, expected, strict=True):
        want = np.repeat(want.repeat(2, 0).repeat(2, 1), 3, axis=2).astype(float)
        assert np.abs(got - want).mean() < 12
    assert not list(tmp_path.glob(".*.part"))  # the temporary file was renamed


def test_chunked_steps_and_flat_memory(world, tmp_path):
    out = tmp_path / "long.mp4"
    # 40 frames in chunks of 3 with a window of 8: the KV pages stay at sink + window + chunk.
    result = write_video(world, out, 40, chunk=3, steps=(2, 1), progress=False)
    assert result.frames == 40 and _decode(out).shape[0] == 40
    s = world.sampler
    assert 0 < result.peak_pages <= s.sink_frames + s.window_frames + 3


def test_video_model_with_class_condition(tmp_path):
    video = crcm.Pipeline.from_config(dataclasses.replace(get_config("tiny"), num_actions=0))
    out = tmp_path / "video.mp4"
    result = write_video(video, out, 5, cond=1, progress=False)
    assert result.frames == 5 and result.width == 256  # 16 px scaled to 256 by default
    assert _decode(out).shape == (5, 256, 256, 3)
    with pytest.raises(ConfigError, match="no actions"):
        write_video(video, out, 5, actions=[0], progress=False)


def test_action_specs(world, tmp_path):
    assert parse_actions("NOOP*2, LEFT,1", world) == [0, 0, 3, 1]
    with pytest.raises(ConfigError, match="unknown action"):
        parse_actions("JUMP", world)
    with pytest.raises(ConfigError, match="repeat"):
        parse_actions("LEFT*x", world)
    path = tmp_path / "actions.txt"
    path.write_text("# warm-up\nNOOP NOOP\nRIGHT, 3  # go\n")
    assert read_action_file(path, world) == [0, 0, 2, 3]
    path.write_text("NOOP\nJUMP\n")
    with pytest.raises(ConfigError, match=r"actions.txt:2: unknown action"):
        read_action_file(path, world)


def test_cli_stream(tmp_path, capsys):
    actions = tmp_path / "a.txt"
    actions.write_text("NOOP FIRE RIGHT LEFT RIGHT\n")
    out = tmp_path / "cli.mp4"
    args = ["stream", str(out), "--model", "breakout", "--action-file", str(actions)]
    assert main([*args, "--quiet", "--scale", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    video = _decode(out)
    assert video.shape == (5, 64, 64, 3)  # the file's 5 actions set the length
    # The video is what crcm.generate makes: begun on the model's opening frames, which are
    # not in the file (test_api checks what those frames hold).
    expected = np.stack(list(crcm.generate(crcm.load("breakout"), 5, actions=[0, 1, 2, 3, 2])))
    assert np.abs(video.astype(float) - expected).mean() < 6
    blind = tmp_path / "blind.mp4"
    assert (
        main([*args[:1], str(blind), *args[2:], "--quiet", "--scale", "1", "--no-opening-frames"])
        == 0
    )
    assert np.abs(_decode(blind).astype(float) - expected).mean() > 2 * 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actions", "JUMP"], "unknown action"),
        (["--model", "no-such-model"], "neither a pipeline folder"),
        (["--frames", "9", "--action-file", "{tmp}/a.txt"], "holds 1 actions"),
        (["--cond", "x.pkl"], "class id or a .npy"),
    ],
)
def test_cli_stream_mistakes_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "a.txt").write_text("0\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["stream", str(tmp_path / "x.mp4"), "--model", "tiny", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("crcm stream: error:")
    assert not list(tmp_path.glob("*.mp4"))
