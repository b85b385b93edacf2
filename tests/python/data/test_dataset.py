"""The dataset format: manifest, seed split, memmap reading, resume and clear errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")

from crcm.data.atari import AtariEnv, run_episode
from crcm.data.dataset import (
    EVAL_SEED_BASE,
    AtariClips,
    AtariDataset,
    CollectConfig,
    DatasetError,
    collect,
)
from crcm.errors import ConfigError, CrcmError

SMALL = CollectConfig(train_episodes=3, eval_episodes=1, max_steps=30, episodes_per_shard=2, seed=5)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return collect(tmp_path_factory.mktemp("ds") / "small", SMALL, progress=False)


def test_manifest_records_what_the_dataset_is(small: Path) -> None:
    m = json.loads((small / "manifest.json").read_text())
    assert m["format"] == "crcm-atari-dataset" and m["version"] == 1
    assert m["frameskip"] == 4 and m["frame_hw"] == [64, 64]
    assert m["games"] == [
        {"id": 0, "name": "breakout", "action_names": ["NOOP", "FIRE", "RIGHT", "LEFT"]}
    ]
    assert m["splits"]["train"]["seeds"] == [5, 6, 7]
    assert m["splits"]["eval"]["seeds"] == [EVAL_SEED_BASE + 5]
    assert len(m["shards"]) == 2 and m["counts"]["episodes"] == 4
    assert all(len(f["sha256"]) == 64 for s in m["shards"] for f in s["files"].values())


def test_reading_gives_the_episodes_the_emulator_plays(small: Path) -> None:
    ds = AtariDataset(small)
    assert len(ds) == 4 and ds.complete
    assert ds.episodes_of("train") == [0, 1, 2] and ds.episodes_of("eval") == [3]
    env = AtariEnv("breakout")
    for i in (1, 3):
        spec, ep = ds.specs[i], ds.episode(i)
        assert isinstance(ep["frames"], np.memmap)
        ref = run_episode(env, spec.policy, spec.seed, max_steps=30)
        np.testing.assert_array_equal(ep["frames"], ref.frames)
        np.testing.assert_array_equal(ep["actions"], ref.actions)
        np.testing.assert_array_equal(ep["ram"], ref.ram)
    assert ds.num_frames == sum(ds.episode_length(i) for i in range(4))


def test_resume_completes_an_interrupted_collection(small: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    m = json.loads((copy / "manifest.json").read_text())
    last = m["shards"].pop()
    m["counts"] = {"episodes": 2, "frames": m["shards"][0]["frames"]}
    (copy / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(copy / last["name"])
    (copy / "shard-00001.tmp").mkdir()  # a half-written shard left by the interruption
    collect(copy, SMALL, progress=False)
    assert json.loads((copy / "manifest.json").read_text()) == json.loads(
        (small / "manifest.json").read_text()
    )
    assert not (copy / "shard-00001.tmp").exists()
    AtariDataset(copy)  # checksums match the original collection


def test_other_settings_in_the_same_folder_are_refused(small: Path) -> None:
    with pytest.raises(DatasetError, match=r"other settings.*frameskip"):
        collect(small, CollectConfig(**{**SMALL.__dict__, "frameskip": 2}), progress=False)
    with pytest.raises(DatasetError, match="frame size is \\(64, 64\\), expected \\(96, 96\\)"):
        AtariDataset(small, frame_hw=(96, 96))


def test_corrupt_and_truncated_shards_are_named(small: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    path = copy / "shard-00001" / "frames.npy"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    AtariDataset(copy, verify=False)  # same size: only the checksum can tell
    with pytest.raises(DatasetError, match=r"shard-00001: frames\.npy fails its sha256 check"):
        AtariDataset(copy)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(DatasetError, match=r"frames\.npy has .* bytes, the manifest says"):
        AtariDataset(copy, verify=False)
    with pytest.raises(DatasetError, match=r"no manifest\.json"):
        AtariDataset(tmp_path)


def test_bad_requests_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown Atari game"):
        collect(tmp_path / "x", CollectConfig(games=("nosuchgame",)), progress=False)
    with pytest.raises(ConfigError, match="training seeds must stay"):
        collect(tmp_path / "y", CollectConfig(seed=EVAL_SEED_BASE), progress=False)


def test_several_games_with_a_game_condition(tmp_path: Path) -> None:
    import torch

    from crcm.codec import PixelCodec

    cfg = CollectConfig(games=("breakout", "pong"), train_episodes=1, eval_episodes=1, max_steps=20)
    ds = AtariDataset(collect(tmp_path / "two", cfg, progress=False))
    assert ds.games == ["breakout", "pong"]
    assert [ds.game_id(i) for i in ds.episodes_of("train")] == [0, 1]
    assert [s.policy for s in ds.specs if s.game == "pong"] == ["random", "random"]
    clips = AtariClips(ds, PixelCodec((64, 64), 3, 1), frames=8, game_cond=True, seed=1)
    b1, b2 = clips.batch(3, 6), clips.batch(3, 6)
    assert b1.x0_B_T_C_H_W.shape == (6, 8, 3, 64, 64)
    torch.testing.assert_close(b1.x0_B_T_C_H_W, b2.x0_B_T_C_H_W)  # pure function of the step
    assert set(b1.cond.tolist()) <= {0, 1}
    a = b1.actions_B_T
    assert int(a.min()) >= 0 and int(a.max()) <= clips.num_actions  # reset -> null action


def test_collect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crcm.cli_data import add_collect_parser

    parser = argparse.ArgumentParser()
    add_collect_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["collect", "--episodes", "1", "--out", str(tmp_path / "c"), "--max-steps", "10", "--quiet"]
    )
    assert args.func(args) == 0
    assert "2 episodes (1 train, 1 eval)" in capsys.readouterr().out
    out = tmp_path / "keys"
    argv = ["collect", "--episodes", "2", "--out", str(out), "--max-steps", "10", "--quiet"]
    args = parser.parse_args([*argv, "--policies", "keys:1"])
    assert args.func(args) == 0
    assert {e[3] for e in AtariDataset(out).manifest["plan"]} == {"keys"}
    for bad in ("keys", "keys:0", "keys:x", ":1"):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--policies", bad])
    args = parser.parse_args([*argv[:-1], "--out", str(tmp_path / "e"), "--policies", "nope:1"])
    with pytest.raises(CrcmError, match="unknown policy 'nope'"):
        args.func(args)
    args = parser.parse_args(["collect", "--game", "nope", "--out", str(tmp_path / "d")])
    with pytest.raises(CrcmError, match="unknown Atari game"):  # main prints it, exit 2
        args.func(args)


def test_clips_load_only_the_requested_rows(small: Path) -> None:
    from crcm.codec import PixelCodec

    clips = AtariClips(AtariDataset(small), PixelCodec((64, 64), 3, 1), frames=4, seed=2)
    whole = clips.batch(7, 6)
    part = clips.batch(7, 6, rows=slice(2, 5))  # one process's share of the global batch
    assert part.x0_B_T_C_H_W.shape[0] == 3
    assert np.array_equal(part.x0_B_T_C_H_W.numpy(), whole.x0_B_T_C_H_W[2:5].numpy())
    assert np.array_equal(part.actions_B_T.numpy(), whole.actions_B_T[2:5].numpy())
    assert clips.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")


def test_a_breakout_run_trains_on_the_dataset(small: Path, tmp_path: Path) -> None:
    """data.kind = "atari": the clips feed the trainer, and the run's pipeline carries the
    game's action names and a KV window of what its clips let it see."""
    from crcm.pipeline import load
    from crcm.training.config import load_config
    from crcm.training.trainer import train

    overrides = [f'out="{tmp_path / "run"}"', 'model="breakout"', "steps=1", "batch_size=2"]
    data = ['data.kind="atari"', f'data.path="{small}"', "data.frames=3"]
    run = train(load_config(None, overrides + data, stage="base"), progress=False)
    pipe = load(run / "pipeline")
    assert pipe.action_names == ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert pipe.sampler.window_frames == 2  # 3-frame clips: two earlier frames at most
    with pytest.raises(ConfigError, match=r"the codec takes \(16, 16\) frames"):  # tiny
        tiny = [f'out="{tmp_path / "tiny"}"', "steps=1", *data]
        train(load_config(None, tiny, stage="base"), progress=False)
    with pytest.raises(ConfigError, match=r"data\.path names the dataset"):
        load_config(None, ['data.kind="atari"'], stage="base")
    with pytest.raises(ConfigError, match=r'data\.kind must be "moving-squares" or "atari"'):
        load_config(None, ['data.kind="video"'], stage="base")


def test_clips_carry_the_frames_before_them(small: Path) -> None:
    """``history = k``: each clip comes with the k frames the episode showed just before it
    (model space), and zeros (a stream's "no past") where the episode had not begun."""
    import torch

    from crcm.codec import PixelCodec

    ds = AtariDataset(small)
    codec = PixelCodec((64, 64), 3, 1)
    clips = AtariClips(ds, codec, frames=3, seed=4, history=2)
    seen_start = seen_middle = False
    for step in range(30):
        batch = clips.batch(step, 8)
        assert batch.history_B_K_C_H_W.shape == (8, 2, 3, 64, 64)
        for b, (episode, start) in enumerate(clips.picks(step, 8)):
            frames = np.asarray(ds.episode(episode)["frames"])
            for i in range(2):
                t = start - 2 + i
                want = (
                    codec.encode(torch.from_numpy(frames[t : t + 1])[None])[0, 0]
                    if t >= 0
                    else torch.zeros(3, 64, 64)
                )
                torch.testing.assert_close(batch.history_B_K_C_H_W[b, i], want)
            seen_start |= start < 2
            seen_middle |= start >= 2
    assert seen_start and seen_middle  # both cases were checked
    assert AtariClips(ds, codec, frames=3).batch(0, 2).history_B_K_C_H_W is None
    with pytest.raises(ConfigError, match="history"):
        AtariClips(ds, codec, frames=3, history=-1)


def test_the_trainer_hands_the_clips_history_to_the_objective(
    small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that reads its previous frames trains with the frames before each clip."""
    from crcm.training import objectives as obj
    from crcm.training.config import load_config
    from crcm.training.trainer import train

    seen = []
    real = obj.tf_teacher_loss

    def spy(*args, history_B_K_C_H_W=None, **kwargs):
        seen.append(history_B_K_C_H_W)
        return real(*args, history_B_K_C_H_W=history_B_K_C_H_W, **kwargs)

    monkeypatch.setattr(obj, "tf_teacher_loss", spy)
    overrides = [f'out="{tmp_path / "run"}"', 'model="breakout"', "steps=1", "batch_size=2"]
    data = ['data.kind="atari"', f'data.path="{small}"', "data.frames=3"]
    train(load_config(None, overrides + data, stage="teacher-tf"), progress=False)
    assert len(seen) == 1 and seen[0].shape == (2, 2, 3, 64, 64)
