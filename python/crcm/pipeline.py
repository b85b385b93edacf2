"""A loadable world model / video generator: network + codec + default sampler + action names.

On disk a pipeline is a folder with ``model.safetensors`` (the network's weights; never a
pickle) and ``crcm.json`` (the network config, the codec, the default sampler and the action
names). ``crcm.load(name_or_path)`` opens such a folder, or a model shipped inside the package
under ``crcm/weights/<name>/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from crcm.codec import Codec, PixelCodec
from crcm.errors import ConfigError
from crcm.models import CausalDiT, DiTConfig, get_config
from crcm.models.wan_weights import load_weights, save_weights
from crcm.sampling import SamplerConfig, get_preset

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).parent / "weights"

__all__ = ["Pipeline", "load", "shipped_models"]


@dataclass
class Pipeline:
    """Everything needed to stream from a model."""

    model: CausalDiT
    codec: Codec
    sampler: SamplerConfig
    action_names: tuple[str, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        cfg = self.model.cfg
        if self.codec.channels != cfg.in_channels:
            raise ConfigError(
                f"codec gives {self.codec.channels} channels but the model takes {cfg.in_channels}"
            )
        if self.latent_chw[1:] != tuple(cfg.frame_hw):
            raise ConfigError(
                f"codec latents are {self.latent_chw[1:]} but the model is built for "
                f"{tuple(cfg.frame_hw)}"
            )
        if self.action_names and len(self.action_names) != cfg.num_actions:
            raise ConfigError(
                f"{len(self.action_names)} action names for a model with {cfg.num_actions} actions"
            )

    @classmethod
    def from_config(
        cls,
        config: str | DiTConfig,
        *,
        codec: Codec | None = None,
        sampler: SamplerConfig | None = None,
        action_names: tuple[str, ...] = (),
        seed: int = 0,
        name: str | None = None,
    ) -> Pipeline:
        """A pipeline with freshly initialised weights (for training, tests and benchmarks).

        Without a codec, a pixel codec is chosen whose latents match the config: 3 channels
        are RGB frames; otherwise grayscale frames packed by space-to-depth.
        """
        cfg = get_config(config) if isinstance(config, str) else config
        if codec is None:
            codec = _default_codec(cfg)
        torch.manual_seed(seed)
        model = CausalDiT(cfg).eval()
        return cls(
            model=model,
            codec=codec,
            sampler=sampler or SamplerConfig(window_frames=8),
            action_names=action_names,
            name=name or (config if isinstance(config, str) else "custom"),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        *,
        config: str | DiTConfig = "wan2.1-1.3b",
        codec: Codec | None = None,
        sampler: SamplerConfig | str = "self-forcing",
        prefix: str = "",
        name: str | None = None,
    ) -> Pipeline:
        """A pipeline around a safetensors checkpoint in crcm, original-Wan or diffusers naming.

        For the public Self-Forcing / CausVid / Causal-rCM releases: ``config="wan2.1-1.3b"``,
        ``prefix="generator_ema."`` when the file holds several models, the ``self-forcing``
        sampler (its warped 4-step times, c3-3, the clean time-0 cache update), and a
        :class:`crcm.codec.VAECodec` wrapping your Wan VAE (crcm ships no VAE weights; without
        one, frames are the latents packed as pixels). Conditions are text-encoder tokens
        ``[text_len, text_dim]`` passed to ``Runtime.open(cond=...)``. Checkpoints saved with
        ``torch.save`` (pickles) are refused: convert them to safetensors where you trust them.
        """
        cfg = get_config(config) if isinstance(config, str) else config
        if str(path).endswith((".pt", ".pth", ".bin", ".ckpt")):
            raise ConfigError(
                f"{path} looks like a pickle; crcm loads safetensors only (never unpickles)"
            )
        model = CausalDiT(cfg)
        try:
            load_weights(model, path, prefix=prefix)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load {path}: {err}") from err
        if isinstance(sampler, str):
            sampler = get_preset(sampler)
        return cls(
            model=model.eval(),
            codec=codec or _default_codec(cfg),
            sampler=sampler,
            name=name or Path(path).stem,
        )

    @property
    def latent_chw(self) -> tuple[int, int, int]:
        h, w = (n // self.codec.spatial_downsample for n in self.codec.frame_hw)
        return (self.codec.channels, h, w)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the uint8 frames the pipeline produces."""
        return (*self.codec.frame_hw, self.codec.frame_channels)

    def action_id(self, action: int | str) -> int:
        """An action given by id or by name, checked."""
        n = self.model.cfg.num_actions
        if isinstance(action, str):
            if action not in self.action_names:
                raise ConfigError(f"unknown action {action!r}; known: {list(self.action_names)}")
            return self.action_names.index(action)
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < n:
            raise ConfigError(f"action must be an int in [0, {n}) or a name, got {action!r}")
        return action

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes ``model.safetensors`` and ``crcm.json`` into the folder ``path`` (atomically)."""
        if not isinstance(self.codec, PixelCodec):
            raise ConfigError("only pipelines with a PixelCodec can be saved for now")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "crcm-pipeline",
            "version": FORMAT_VERSION,
            "name": self.name,
            "model": dataclasses.asdict(self.model.cfg),
            "codec": {
                "type": "pixel",
                "frame_hw": list(self.codec.frame_hw),
                "frame_channels": self.codec.frame_channels,
                "patch": self.codec.patch,
            },
            "sampler": dataclasses.asdict(self.sampler),
            "action_names": list(self.action_names),
        }
        save_weights(self.model, folder / "model.safetensors")
        _atomic_write(folder / "crcm.json", json.dumps(meta, indent=2))
        return folder


def shipped_models() -> list[str]:
    """Names of the models that ship inside the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "crcm.json").is_file())


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Pipeline:
    """Loads a shipped model by name or a saved pipeline folder."""
    folder = Path(name_or_path)
    if not (folder / "crcm.json").is_file():
        shipped = SHIPPED_DIR / str(name_or_path)
        if not (shipped / "crcm.json").is_file():
            names = shipped_models()
            raise ConfigError(
                f"{str(name_or_path)!r} is neither a pipeline folder (with crcm.json and "
                f"model.safetensors) nor a shipped model ({', '.join(names) or 'none shipped'})"
            )
        folder = shipped
    try:
        meta = json.loads((folder / "crcm.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {folder / 'crcm.json'}: {err}") from err
    if meta.get("format") != "crcm-pipeline" or meta.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{folder / 'crcm.json'} is not a crcm pipeline of version {FORMAT_VERSION}"
        )
    try:
        model_cfg = _dataclass_from(DiTConfig, meta["model"])
        codec_meta = meta["codec"]
        if codec_meta.get("type") != "pixel":
            raise ConfigError(f"unknown codec type {codec_meta.get('type')!r}")
        codec = PixelCodec(
            tuple(codec_meta["frame_hw"]), codec_meta["frame_channels"], codec_meta["patch"]
        )
        sampler = _dataclass_from(SamplerConfig, meta["sampler"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{folder / 'crcm.json'} is incomplete or malformed: {err}") from err
    model = CausalDiT(model_cfg)
    try:
        load_weights(model, folder / "model.safetensors", naming="crcm")
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load {folder / 'model.safetensors'}: {err}") from err
    model = model.to(device=device, dtype=dtype).eval()
    return Pipeline(
        model=model,
        codec=codec,
        sampler=sampler,
        action_names=tuple(meta.get("action_names", ())),
        name=str(meta.get("name", folder.name)),
    )


def _default_codec(cfg: DiTConfig) -> PixelCodec:
    if cfg.in_channels == 3:
        return PixelCodec(tuple(cfg.frame_hw), 3, 1)
    patch = round(cfg.in_channels**0.5)
    if patch * patch != cfg.in_channels:
        raise ConfigError(f"no default pixel codec for {cfg.in_channels} channels; pass codec=")
    return PixelCodec((cfg.frame_hw[0] * patch, cfg.frame_hw[1] * patch), 1, patch)


def _dataclass_from(cls, values: dict):
    """Builds a frozen dataclass from JSON (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # readers never see a half-written file
