"""The adversarial term (``adv_weight``, crcm.training.critic): a patch critic that learns to
tell a sharp moving object from a smeared one, whose gradient asks a smeared frame for the
object whole, and the teacher-tf stage that trains a model against it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from world_models import WM, randomized

from crcm.data.dataset import CollectConfig, collect
from crcm.errors import ConfigError
from crcm.models import CausalDiT
from crcm.models.dit import preceding_frames
from crcm.pipeline import load
from crcm.training.checkpoint import latest_checkpoint
from crcm.training.config import load_config
from crcm.training.critic import Adversary, FrameCritic, critic_loss, moving_patches
from crcm.training.objectives import tf_teacher_loss
from crcm.training.trainer import train

H = W = 16


def dot_frames(n: int, gen: torch.Generator, *, smear: bool) -> tuple[Tensor, Tensor]:
    """``(frame, prev)``: a bright 1-pixel dot on a dark frame after the frame where it was one
    pixel to its left; with ``smear`` the frame's dot is a faint 3×3 blur of it instead (what
    a regression that cannot place the dot draws)."""
    frame = torch.full((n, 1, H, W), -1.0)
    prev = torch.full((n, 1, H, W), -1.0)
    ys = torch.randint(2, H - 2, (n,), generator=gen)
    xs = torch.randint(3, W - 2, (n,), generator=gen)
    for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True)):
        prev[i, 0, y, x - 1] = 1.0
        if smear:
            frame[i, 0, y - 1 : y + 2, x - 1 : x + 2] = -1.0 + 2.0 / 9
        else:
            frame[i, 0, y, x] = 1.0
    return frame, prev


def trained_critic(updates: int = 150) -> FrameCritic:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    critic = FrameCritic(1, 1, width=16)
    opt = torch.optim.AdamW(critic.parameters(), lr=2e-3, betas=(0.5, 0.999), weight_decay=0)
    adversary = Adversary(critic, opt, weight=1.0, updates=1)
    for _ in range(updates):
        real, prev = dot_frames(32, gen, smear=False)
        fake, _ = dot_frames(32, gen, smear=True)
        adversary.generator_term(fake, real, prev)  # keeps the frames for the update
        adversary.update()
    return critic


def test_moving_patches_mark_only_where_the_frame_changed():
    gen = torch.Generator().manual_seed(1)
    frame, prev = dot_frames(4, gen, smear=False)
    like = torch.zeros(4, 1, H // 4, W // 4)
    assert moving_patches(prev, prev, like).sum() == 0  # a still frame: nothing to judge
    marked = moving_patches(frame, prev, like)
    assert marked.sum(dim=(1, 2, 3)).min() >= 1 and marked.sum(dim=(1, 2, 3)).max() <= 2


def test_the_critic_learns_a_sharp_dot_from_a_smeared_one():
    gen = torch.Generator().manual_seed(7)  # held out: other dots than it trained on
    real, prev = dot_frames(64, gen, smear=False)
    fake, _ = dot_frames(64, gen, smear=True)
    untrained = FrameCritic(1, 1, width=16)
    assert critic_loss(untrained, real, fake, prev) > 1.5  # near chance (2)
    critic = trained_critic()
    assert critic_loss(critic, real, fake, prev) < 0.5
    assert (critic(real, prev).amax((1, 2, 3)) > critic(fake, prev).amax((1, 2, 3))).all()


def test_the_generator_term_asks_a_smeared_dot_to_be_drawn_whole_and_leaves_the_critic_be():
    critic = trained_critic()
    critic.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    gen = torch.Generator().manual_seed(9)
    real, prev = dot_frames(16, gen, smear=False)
    smeared, _ = dot_frames(16, gen, smear=True)
    fake = smeared.clone().requires_grad_(True)
    adversary = Adversary(critic, torch.optim.SGD(critic.parameters(), lr=0.0), weight=1.0)
    opt = torch.optim.Adam([fake], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        adversary.generator_term(fake, real, prev).backward()
        opt.step()
        with torch.no_grad():
            fake.clamp_(-1, 1)
    assert all(p.grad is None and p.requires_grad for p in critic.parameters())
    for k, v in critic.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # Where the dot belongs, the frame brightened (the smear's centre was 2/9 above black).
    at_dot = real > 0
    assert (fake.detach()[at_dot] - smeared[at_dot]).mean() > 0.3


def test_tf_teacher_loss_adds_the_critic_term_on_its_clean_frame_estimates():
    model = randomized(CausalDiT(WM).double())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, WM.in_channels, *WM.frame_hw, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, WM.num_actions, (2, 3), generator=gen)
    channels = WM.in_channels
    critic = FrameCritic(channels, WM.prev_frames * channels).double()
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    adversary = Adversary(critic, opt, weight=0.5, updates=2)

    def loss(adv):
        g = torch.Generator().manual_seed(3)
        return tf_teacher_loss(model, x0, actions_B_T=actions, adversary=adv, generator=g)

    plain, plain_logs = loss(None)
    with_term, logs = loss(adversary)
    assert "adv" not in plain_logs and "adv" in logs
    torch.testing.assert_close(with_term, plain + logs["adv"])
    assert adversary.update() is not None and adversary.update() is None  # judged once
    # The critic judged each frame after its true previous frames.
    loss(adversary)
    real, _, prev = adversary._seen[0]
    torch.testing.assert_close(real, x0.flatten(0, 1))
    torch.testing.assert_close(prev, preceding_frames(x0, WM.prev_frames).flatten(0, 1))

    no_prev = randomized(CausalDiT(WM.replace(prev_frames=0, prediction="x0")).double())
    with pytest.raises(ValueError, match="needs prev_frames"):
        tf_teacher_loss(no_prev, x0, actions_B_T=actions, adversary=adversary)


def test_adversarial_settings_are_checked():
    with pytest.raises(ConfigError, match="adv_weight is a setting of stage teacher-tf only"):
        load_config(None, ["adv_weight=0.1", 'teacher="t"'], stage="tf-scm")
    with pytest.raises(ConfigError, match="critic_warmup_steps"):
        load_config(None, ["adv_weight=0.1", "critic_warmup_steps=-1"], "teacher-tf")
    with pytest.raises(ConfigError, match="critic_updates"):
        load_config(None, ["adv_weight=0.1", "critic_updates=0"], stage="teacher-tf")


@pytest.fixture(scope="module")
def breakout_data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("critic")
    # 40 steps: the first ~30 frames of an episode are still (nothing for the critic to judge).
    small = CollectConfig(train_episodes=2, eval_episodes=1, max_steps=40, seed=5)
    data = collect(tmp / "data", small, progress=False)
    return [
        'model="breakout"',
        "batch_size=2",
        'data.kind="atari"',
        f'data.path="{data}"',
        "data.frames=3",
    ]


def test_the_critic_warms_up_alone_then_trains_the_model_and_resumes(
    tmp_path: Path, breakout_data: list[str]
):
    first = load_config(
        None,
        [f'out="{tmp_path / "t"}"', "steps=1", *breakout_data],
        stage="teacher-tf",
    )
    teacher = train(first, progress=False)
    start = load(teacher / "pipeline").model.state_dict()
    common = [
        f'out="{tmp_path / "adv"}"',
        f'init="{teacher}"',
        "adv_weight=0.1",
        "critic_updates=2",
        "critic_warmup_steps=2",
        "checkpoint_every=1",
        "keep_checkpoints=5",
        "ema_decay=0",
        *breakout_data,
    ]
    logs: list[dict[str, float]] = []
    run = train(
        load_config(None, ["steps=2", *common], stage="teacher-tf"),
        progress=False,
        on_step=lambda step, log: logs.append(log),
    )
    assert len(logs) == 2 and all("adv" in log for log in logs)
    assert max(log["critic_loss"] for log in logs) > 0  # (a batch may hold only still frames)
    # Two warm-up steps: the critic learnt, the model did not move.
    for name, p in load(run / "pipeline").model.state_dict().items():
        torch.testing.assert_close(p, start[name], rtol=0, atol=0, msg=name)
    critic_step2 = load_file(latest_checkpoint(run) / "critic.safetensors")
    assert critic_step2
    # Resumed for a third step: the model trains now, the critic goes on from its checkpoint.
    train(load_config(None, ["steps=3", *common], stage="teacher-tf"), progress=False)
    moved = load(run / "pipeline").model.state_dict()
    assert any(not torch.equal(moved[k], start[k]) for k in start)
    critic_step3 = load_file(latest_checkpoint(run) / "critic.safetensors")
    assert any(not torch.equal(critic_step3[k], v) for k, v in critic_step2.items())


def test_the_critic_starts_from_critic_init_and_a_wrong_file_is_refused(
    tmp_path: Path, breakout_data: list[str]
):
    channels = 3
    critic = FrameCritic(channels, 2 * channels)  # Breakout: RGB frames, two previous frames
    save_file(critic.state_dict(), tmp_path / "critic.safetensors")
    save_file(FrameCritic(1, 1).state_dict(), tmp_path / "other.safetensors")
    common = ["adv_weight=0.1", "steps=1", "critic_lr=1e-12", *breakout_data]

    def run(name: str, init: str):
        out = f'out="{tmp_path / name}"'
        cfg = load_config(None, [out, f'critic_init="{init}"', *common], stage="teacher-tf")
        return train(cfg, progress=False)

    trained = load_file(
        latest_checkpoint(run("a", tmp_path / "critic.safetensors")) / "critic.safetensors"
    )
    for name, p in critic.state_dict().items():
        torch.testing.assert_close(trained[name], p, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match="is not a critic for this model"):
        run("b", tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="is not a critic for this model"):
        run("c", tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="critic_init starts the critic"):
        load_config(None, ['critic_init="x"'], stage="teacher-tf")
