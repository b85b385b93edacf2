"""Prompts through Wan2.1's umT5 text encoder, with Wan's 512-token rule and an LRU cache.

Wan's rule (Wan2.1's ``T5EncoderModel``; diffusers' ``WanPipeline._get_t5_prompt_embeds``):
clean the prompt (ftfy when installed, HTML unescape, collapse whitespace), tokenize it padded
and truncated to ``text_len`` tokens with ``</s>`` appended, run the encoder with the attention
mask, keep the prompt's own tokens and set every position past them to exactly zero. The DiT's
cross-attention sees those zeros, so they are part of the condition, not padding to ignore.

A stream's prompt changes rarely and the negative prompt never, so embeddings are cached per
(cleaned) prompt text; a prompt switched back and forth is encoded once.
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from crcm.errors import ConfigError
from crcm.wan.folder import read_weights, weight_files

__all__ = ["WAN_NEGATIVE_PROMPT", "WAN_NEGATIVE_PROMPT_EN", "WanTextEncoder", "clean_prompt"]

# Wan2.1's default negative prompt, verbatim from the Wan2.1 repository's
# wan/configs/shared_config.py (``sample_neg_prompt``); Self-Forcing and CausVid encode the same
# text as their unconditional input. Wan was trained with Chinese negative prompts, so this is
# the default rather than a translation.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# The English translation diffusers' WanPipeline example uses (pipeline_wan.py's docstring).
WAN_NEGATIVE_PROMPT_EN = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)

try:  # diffusers and Wan both fix mojibake with ftfy when it is installed
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning, as diffusers' ``prompt_clean`` does it."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """umT5 prompt embeddings ``[B, text_len, dim]``, zero past each prompt, LRU-cached.

    ``encoder`` is a ``transformers.UMT5EncoderModel`` (moved to ``device``/``dtype`` when
    given, else used where it is), ``tokenizer`` its tokenizer. ``cache_size`` prompts are
    kept (0 turns the cache off); the cache holds only each prompt's own tokens, not the zeros.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer,
        *,
        text_len: int = 512,
        cache_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise ConfigError(f"text_len must be a positive int, got {text_len!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigError(f"cache_size must be an int ≥ 0, got {cache_size!r}")
        if device is not None or dtype is not None:
            encoder = encoder.to(device=device, dtype=dtype)
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # serving threads share one encoder and cache

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_len: int = 512,
        cache_size: int = 64,
    ) -> WanTextEncoder:
        """Load ``folder/text_encoder`` and ``folder/tokenizer`` of a local diffusers Wan folder.

        The encoder is built on the meta device from its ``config.json`` and its safetensors
        (one file or shards listed in ``model.safetensors.index.json``) are assigned tensor by
        tensor in ``dtype``, so the float32 weights never exist twice and ``accelerate`` is not
        needed. Nothing is downloaded.
        """
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        folder = Path(folder)
        encoder_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
        for needed in (encoder_dir, tokenizer_dir):
            if not needed.is_dir():
                raise ConfigError(f"not a Wan folder: {needed} is missing")
        config_path = encoder_dir / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"text encoder config missing: {config_path}")
        try:
            config_dict = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read {config_path}: {error}") from None
        if config_dict.get("model_type") != "umt5":
            model_type = config_dict.get("model_type")
            raise ConfigError(f"{config_path}: model_type is {model_type!r}, expected 'umt5'")
        config = UMT5Config.from_dict(config_dict)

        with torch.device("meta"):
            encoder = UMT5EncoderModel(config)
        files = weight_files(encoder_dir, "model.safetensors", "text encoder")
        state_dict = read_weights(files, dtype=dtype)
        _assign_weights(encoder, state_dict, encoder_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"cannot load the tokenizer in {tokenizer_dir}: {reason}") from None
        return cls(
            encoder, tokenizer, text_len=text_len, cache_size=cache_size, device=device, dtype=dtype
        )

    @property
    def dim(self) -> int:
        """Width of the embeddings (umT5's ``d_model``; 4096 for umT5-XXL)."""
        return int(self.encoder.config.d_model)

    def encode(self, prompts: Sequence[str] | str) -> Tensor:
        """Embeddings ``[B, text_len, dim]`` of ``prompts`` (one string gives ``B = 1``).

        Always a fresh tensor (never a view of the cache) on the encoder's device and dtype,
        created outside inference mode so that it can feed a training graph.
        """
        prompts = _check_prompts(prompts)
        keys = [clean_prompt(p) for p in prompts]
        with self._lock:
            found: dict[str, Tensor] = {}
            for key in keys:
                if key in self._cache and key not in found:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            if missing:
                for key, embedding in zip(missing, self._run_encoder(missing), strict=True):
                    found[key] = embedding
                    if self.cache_size:
                        self._cache[key] = embedding
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        parameter = next(self.encoder.parameters())
        out = torch.zeros(
            len(keys), self.text_len, self.dim, device=parameter.device, dtype=parameter.dtype
        )
        for row, key in zip(out, keys, strict=True):
            row[: found[key].shape[0]] = found[key]
        return out

    def clear_cache(self) -> None:
        """Forget every cached prompt (e.g. after changing the encoder's weights)."""
        with self._lock:
            self._cache.clear()

    def _run_encoder(self, texts: list[str]) -> list[Tensor]:
        """Each text's embeddings up to its token count, ``[n_i, dim]``, as its own tensor."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.encoder.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        with torch.inference_mode():
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            lengths = mask.gt(0).sum(dim=1).tolist()
            # clone: a slice would keep the whole padded batch alive in the cache
            return [h[:n].clone() for h, n in zip(hidden, lengths, strict=True)]


def _check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ConfigError(
            f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ConfigError(f"prompts[{index}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


def _assign_weights(encoder: torch.nn.Module, state_dict: dict[str, Tensor], where: Path) -> None:
    """Assign the weights to the meta-built encoder; the embedding is stored once, shared.

    Checkpoints keep umT5's input embedding as ``shared.weight``, as
    ``encoder.embed_tokens.weight``, or both; either name serves both modules. A full umT5
    checkpoint's ``decoder.*`` and ``lm_head.*`` are ignored.
    """
    shared_names = ("shared.weight", "encoder.embed_tokens.weight")
    embedding = next((state_dict[n] for n in shared_names if n in state_dict), None)
    if embedding is not None:
        for name in shared_names:
            state_dict[name] = embedding
    expected = encoder.state_dict().keys()
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(
        k for k in state_dict.keys() - expected if not k.startswith(("decoder.", "lm_head."))
    )
    if missing or unexpected:
        shown = ", ".join(
            [*(f"missing {k}" for k in missing), *(f"unexpected {k}" for k in unexpected)][:6]
        )
        raise ConfigError(f"text encoder weights in {where} do not fit UMT5EncoderModel: {shown}")
    try:
        encoder.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ConfigError(f"text encoder weights in {where} do not fit: {first[-1]}") from None
    encoder.set_input_embeddings(encoder.shared)
    on_meta = [n for n, t in (*encoder.named_parameters(), *encoder.named_buffers()) if t.is_meta]
    if on_meta:
        raise ConfigError(f"text encoder weights in {where} leave {on_meta[:3]} unset")
