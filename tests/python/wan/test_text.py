"""The tiny Wan folder and WanTextEncoder: Wan's text rule, checked against diffusers itself."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from crcm.errors import ConfigError
from crcm.wan.text import WAN_NEGATIVE_PROMPT, WanTextEncoder
from crcm.wan.tiny import make_tiny_wan_folder, tiny_tokenizer, tiny_wan_configs

TEXT_LEN = 16
PROMPTS = ["a cat walks on the beach", "A red ball bounces off the wall!", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "tiny-wan", seed=0)


@pytest.fixture(scope="module")
def pipe(folder: Path):
    """diffusers' WanPipeline from the tiny folder, as a user would load it."""
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(str(folder), **_transformer_override(folder))


def _transformer_override(folder: Path) -> dict:
    """Without ``accelerate``, diffusers 0.42 refuses to load any ``WanTransformer3DModel``
    (its fp32-kept modules need ``low_cpu_mem_usage``); then the transformer is built from its
    config and safetensors here and handed to the pipeline, still checking the files."""
    try:
        import accelerate  # noqa: F401

        return {}
    except ImportError:
        from diffusers import WanTransformer3DModel
        from safetensors.torch import load_file

        transformer = WanTransformer3DModel.from_config(
            WanTransformer3DModel.load_config(str(folder / "transformer"))
        )
        weights = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        transformer.load_state_dict(weights, strict=True)
        return {"transformer": transformer}


@pytest.fixture(scope="module")
def encoder(folder: Path) -> WanTextEncoder:
    return WanTextEncoder.from_folder(folder, text_len=TEXT_LEN)


def _count_calls(text_encoder: WanTextEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the umT5 forward to record each call's batch size."""
    calls: list[int] = []
    forward = text_encoder.encoder.forward

    def counting(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(text_encoder.encoder, "forward", counting)
    return calls


def test_tiny_folder_has_wan_layout_and_loads_in_diffusers(folder: Path, pipe) -> None:
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir(), sub
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    configs = tiny_wan_configs()
    assert pipe.transformer.config.num_attention_heads == 2
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model == 32
    assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim == 16
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.tokenizer.model_max_length == configs["text_len"] == 512
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"


def test_tiny_folder_is_deterministic(tmp_path: Path, folder: Path) -> None:
    again = make_tiny_wan_folder(tmp_path / "again", seed=0)
    other = make_tiny_wan_folder(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (folder / name).read_bytes()
    assert (other / name).read_bytes() != (folder / name).read_bytes()


def test_tiny_tokenizer_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    text = "A Cat jumps over 3 zebras."
    assert loaded(text).input_ids == tokenizer(text).input_ids
    ids = tokenizer(text).input_ids
    assert ids[-1] == 1 and 2 not in ids  # </s> appended; ASCII never needs <unk>


def test_encode_shape_and_zero_past_prompt(encoder: WanTextEncoder) -> None:
    out = encoder.encode(PROMPTS)
    assert out.shape == (3, TEXT_LEN, 32) and out.dtype == torch.float32
    counts = encoder.tokenizer(PROMPTS, truncation=True, max_length=TEXT_LEN).input_ids
    for row, ids in zip(out, counts, strict=True):
        assert row[len(ids) :].eq(0).all()
        assert row[: len(ids)].abs().sum(dim=-1).gt(0).all()
    assert encoder.encode(PROMPTS[0]).shape == (1, TEXT_LEN, 32)
    assert encoder.dim == 32


@pytest.mark.parametrize("text_len", [TEXT_LEN, 512])
def test_matches_diffusers_wan_pipeline(folder: Path, pipe, text_len: int) -> None:
    """The key equivalence: diffusers' own Wan prompt encoding, value for value."""
    ours = WanTextEncoder.from_folder(folder, text_len=text_len)
    long_prompt = " ".join(["the camera pans over a green forest"] * 4)  # truncated at 16
    prompts = [*PROMPTS, long_prompt, "  a  &amp; cat\n walks  "]
    with torch.inference_mode():
        theirs, negative = pipe.encode_prompt(
            prompts,
            negative_prompt=[WAN_NEGATIVE_PROMPT] * len(prompts),
            max_sequence_length=text_len,
            device=torch.device("cpu"),
        )
    assert theirs.shape == (len(prompts), text_len, 32)
    torch.testing.assert_close(ours.encode(prompts), theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.encode(WAN_NEGATIVE_PROMPT), negative[:1], rtol=1e-5, atol=1e-6)
    if text_len == 512:  # the padding rule at Wan's length: all but a few positions are zero
        assert ours.encode("a cat")[0, 3:].eq(0).all()


def test_prompts_differ_and_repeat_identically(encoder: WanTextEncoder) -> None:
    encoder.clear_cache()
    first = encoder.encode(["a cat", "a dog"])
    assert not torch.equal(first[0], first[1])
    encoder.clear_cache()
    assert torch.equal(encoder.encode(["a cat", "a dog"]), first)  # recomputed: same values
    assert torch.equal(encoder.encode("a cat")[0], first[0])  # cached: same values


def test_lru_cache_hits_and_evicts(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = WanTextEncoder.from_folder(folder, text_len=TEXT_LEN, cache_size=2)
    calls = _count_calls(text, monkeypatch)
    a = text.encode("a cat")
    text.encode(["a dog", "a cat", "a dog"])  # one call, for "a dog" only (deduplicated)
    assert calls == [1, 1]
    assert torch.equal(text.encode("a cat"), a) and calls == [1, 1]  # hit: no call
    text.encode("a bird")  # evicts the least recently used, "a dog"
    assert calls == [1, 1, 1]
    text.encode(["a cat", "a bird"])
    assert calls == [1, 1, 1]
    text.encode("a dog")
    assert calls == [1, 1, 1, 1]
    text.clear_cache()
    text.encode("a dog")
    assert len(calls) == 5


def test_cache_off_and_whitespace_variants_share_an_entry(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = WanTextEncoder.from_folder(folder, text_len=TEXT_LEN, cache_size=0)
    calls = _count_calls(off, monkeypatch)
    off.encode("a cat")
    off.encode("a cat")
    assert calls == [1, 1]
    on = WanTextEncoder.from_folder(folder, text_len=TEXT_LEN)
    calls = _count_calls(on, monkeypatch)
    assert torch.equal(on.encode("a cat"), on.encode("  a   cat "))  # Wan cleans whitespace
    assert calls == [1]


def test_returned_tensor_does_not_alias_the_cache(encoder: WanTextEncoder) -> None:
    first = encoder.encode("a horse runs")
    expected = first.clone()
    first.fill_(7.0)
    assert torch.equal(encoder.encode("a horse runs"), expected)
    assert not first.is_inference()  # usable as an input of a training graph


@pytest.mark.parametrize("bad", [None, 3, ["a cat", None], [b"bytes"], {"a": 1}])
def test_bad_prompts_raise_config_error(encoder: WanTextEncoder, bad) -> None:
    with pytest.raises(ConfigError, match="string"):
        encoder.encode(bad)


def test_empty_prompt_is_valid(encoder: WanTextEncoder) -> None:
    out = encoder.encode("")
    assert out[0, 0].abs().sum() > 0 and out[0, 1:].eq(0).all()  # just </s>


@pytest.mark.parametrize("part", ["text_encoder", "tokenizer"])
def test_missing_parts_name_the_path(folder: Path, tmp_path: Path, part: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ConfigError, match=re.escape(str(broken / part))) as info:
        WanTextEncoder.from_folder(broken)
    assert "\n" not in str(info.value)


def test_missing_weights_and_sharded_weights(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "sharded"
    shutil.copytree(folder, copy)
    single = copy / "text_encoder" / "model.safetensors"
    weights = load_file(str(single))
    single.unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        WanTextEncoder.from_folder(copy)
    names = sorted(weights)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(copy / "text_encoder" / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (copy / "text_encoder" / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    sharded = WanTextEncoder.from_folder(copy, text_len=TEXT_LEN)
    reference = WanTextEncoder.from_folder(folder, text_len=TEXT_LEN)
    assert torch.equal(sharded.encode(PROMPTS), reference.encode(PROMPTS))
    (copy / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="model-00002-of-00002"):
        WanTextEncoder.from_folder(copy)


def test_from_folder_dtype_and_tied_embedding(folder: Path) -> None:
    half = WanTextEncoder.from_folder(folder, text_len=TEXT_LEN, dtype=torch.bfloat16)
    assert half.encode("a cat").dtype == torch.bfloat16
    model = half.encoder
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert not any(p.is_meta for p in model.parameters())
