"""Tiny random Wan2.1 text-to-video folders, built offline in about a second.

A folder written by :func:`make_tiny_wan_folder` has the layout of ``Wan2.1-T2V-*-Diffusers``
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) and loads with ``diffusers.WanPipeline.from_pretrained``, so tests and examples
exercise the same loading code as the real checkpoints without downloading anything. The
weights are random (``torch.manual_seed(seed)``): outputs are noise, but shapes, names, configs
and the text rule are Wan's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import string
from pathlib import Path

import torch

from crcm.models import DiTConfig

__all__ = ["TINY_WORDS", "make_tiny_wan_folder", "tiny_tokenizer", "tiny_wan_configs"]

# Wan's text rule pads prompts to 512 umT5 tokens; the tiny folder keeps that default.
DEFAULT_TEXT_LEN = 512

# Whole-word pieces of the tiny tokenizer; any other lowercase word falls back to characters.
_TINY_WORDS_TEXT = """
    a an the and or of in on at to with from by for into over under through near behind above
    is are was be being it its this that these there here while as slowly quickly gently very
    cat dog bird fish horse cow sheep rabbit fox bear lion tiger wolf deer duck mouse panda
    man woman boy girl child people person player robot car truck bus train boat plane ship
    ball paddle brick wall ground floor sky sea ocean river lake beach mountain hill forest
    tree flower grass field road street city house room kitchen window door table chair bed
    sun moon star cloud rain snow fire water light shadow smoke wind storm night day morning
    red orange yellow green blue purple pink white black gray brown gold silver bright dark
    big small tall short long wide old new young happy sad calm wild soft hard warm cold
    walks runs jumps flies swims sits stands dances plays eats drinks looks turns moves falls
    rolls bounces spins rises shines glows waves smiles cooks bakes reads writes sings rides
    walking running jumping flying swimming sitting standing dancing playing moving falling
    camera view shot close up wide aerial pan zoom scene video frame style cinematic realistic
    cartoon anime painting photo detailed quality high low sharp blurry static motion game
    score left right top bottom center middle front back side one two three many some all
    cake flour batter spoon cup bowl bread fruit apple coffee tea food breakfast dinner
    """
TINY_WORDS = tuple(_TINY_WORDS_TEXT.split())


def tiny_tokenizer(path: str | Path | None = None, *, model_max_length: int = DEFAULT_TEXT_LEN):
    """A small umT5-style tokenizer made in code (no sentencepiece model, no download).

    Like umT5's: a Unigram model with ``"▁"`` word boundaries, ``<pad>`` = 0, ``</s>`` = 1,
    ``<unk>`` = 2, and ``</s>`` appended to every sequence. The vocabulary is lowercase words
    (:data:`TINY_WORDS`) plus single characters, so every ASCII prompt tokenizes without
    ``<unk>`` (input is NFKC-normalised and lowercased first). Saved with ``save_pretrained``
    when ``path`` is given, so ``AutoTokenizer.from_pretrained(path)`` loads it back.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    # Whole words score higher than their spelling in characters, so the Viterbi split keeps
    # a known word in one piece.
    chars = ["▁", *string.ascii_lowercase, *string.digits, *string.punctuation]
    vocab = [(s, 0.0) for s in specials]
    vocab += [(f"▁{w}", -2.0) for w in dict.fromkeys(TINY_WORDS)]
    vocab += [(c, -6.0) for c in chars]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )
    if path is not None:
        tokenizer.save_pretrained(str(path))
        _portable_tokenizer_class(Path(path) / "tokenizer_config.json", ("tokenizer_class",))
    return tokenizer


def tiny_wan_configs(*, vocab_size: int | None = None, text_len: int | None = None) -> dict:
    """The configs of the tiny Wan folder, as keyword arguments of each component's class.

    Keys: ``"transformer"`` (``WanTransformer3DModel``), ``"vae"`` (``AutoencoderKLWan``),
    ``"text_encoder"`` (``transformers.UMT5Config``), ``"scheduler"``
    (``UniPCMultistepScheduler``) and ``"text_len"`` (the tokenizer's ``model_max_length``).
    Shapes follow Wan2.1 where it matters to crcm: 16 latent channels, patch (1, 2, 2), the
    VAE's 8× spatial and 4× temporal compression, Wan's RMS q/k norms; only widths shrink.
    """
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer())
    text_dim = 32
    return {
        "transformer": {
            "patch_size": (1, 2, 2),
            # head_dim 12: crcm's 3D RoPE splits it 4 (time) + 4 (height) + 4 (width).
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": text_dim,
            "freq_dim": 256,
            "ffn_dim": 48,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "rope_max_seq_len": 1024,
        },
        "vae": {
            # Compression comes from the number of stages, not their width: 3 spatial halvings
            # (8×) and 2 temporal ones (4×), as in Wan's VAE, at 3 channels a stage.
            "base_dim": 3,
            "z_dim": 16,
            "dim_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_scales": [],
            "temperal_downsample": [False, True, True],
        },
        "text_encoder": {
            "vocab_size": vocab_size,
            "d_model": text_dim,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "layer_norm_epsilon": 1e-6,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
        # Wan2.1-T2V-*-Diffusers' scheduler_config.json (flow matching through UniPC).
        "scheduler": {
            "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": 3.0,
            "solver_order": 2,
            "solver_type": "bh2",
            "final_sigmas_type": "zero",
        },
        "text_len": DEFAULT_TEXT_LEN if text_len is None else text_len,
    }


def make_tiny_wan_folder(path: str | Path, *, seed: int = 0, text_len: int | None = None) -> Path:
    """Write a tiny random ``WanPipeline`` to ``path`` (safetensors) and return the path.

    ``text_len`` (default 512, Wan's) becomes the tokenizer's ``model_max_length``; the
    diffusers components do not store it. Everything is built on the CPU in float32.
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    configs = tiny_wan_configs(text_len=text_len)
    tokenizer = tiny_tokenizer(model_max_length=configs["text_len"])
    configs = copy.deepcopy(configs)
    configs["text_encoder"]["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        text_encoder = UMT5EncoderModel(UMT5Config(**configs["text_encoder"])).eval()
        transformer = WanTransformer3DModel(**configs["transformer"]).eval()
        vae = AutoencoderKLWan(**configs["vae"]).eval()
    for module in (text_encoder, transformer, vae):
        _randomize_constant_inits(module, seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.float(),
        transformer=transformer.float(),
        vae=vae.float(),
        scheduler=UniPCMultistepScheduler(**configs["scheduler"]),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    _portable_tokenizer_class(path / "tokenizer" / "tokenizer_config.json", ("tokenizer_class",))
    _portable_tokenizer_class(path / "model_index.json", ("tokenizer", 1))
    return path


def _portable_tokenizer_class(json_path: Path, key: tuple) -> None:
    """Record the tokenizer as ``PreTrainedTokenizerFast``.

    transformers 5 names its tokenizer.json-backed class ``TokenizersBackend``, a name
    transformers 4 does not know; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in
    both (in 5 it is an alias of ``TokenizersBackend``).
    """
    data = json.loads(json_path.read_text())
    *parents, last = key
    target = data
    for part in parents:
        target = target[part]
    target[last] = "PreTrainedTokenizerFast"
    json_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _randomize_constant_inits(module: torch.nn.Module, seed: int) -> None:
    """Give zero- or constant-initialised parameters small random values.

    diffusers starts some of Wan's parameters at exact constants (norm weights at one, biases
    at zero); a test comparing two implementations on such weights could not tell a missing
    norm weight or bias from a correct one.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                noise = torch.randn(parameter.shape, generator=generator) * 0.02
                parameter.add_(noise.to(parameter.dtype))


def tiny_text_config(text_dim: int = 8, text_len: int = 4) -> DiTConfig:
    """A text-conditioned DiT of a few thousand parameters (8×8 latents, 16 tokens a frame), for
    tests of prompts and condition switching without a real encoder."""
    return DiTConfig(
        in_channels=4,
        out_channels=4,
        dim=24,
        num_layers=2,
        num_heads=2,
        ffn_dim=48,
        frame_hw=(8, 8),
        cond="text",
        text_dim=text_dim,
        text_len=text_len,
    )


class HashTextEncoder:
    """A stand-in prompt encoder (no tokenizer, no weights): each prompt's tokens are drawn from
    a generator seeded by the prompt's SHA-256, so equal prompts give equal tokens and others
    differ. ``calls`` counts ``encode`` calls."""

    def __init__(self, dim: int = 8, text_len: int = 4) -> None:
        self.dim, self.text_len = dim, text_len
        self.calls = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        rows = []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
            gen = torch.Generator().manual_seed(seed)
            rows.append(torch.randn(self.text_len, self.dim, generator=gen))
        return torch.stack(rows)
