"""Load a checkpoint of any layout (formats.py) into the core's MusicGen: LM, T5 text encoder, codec.

    from stage_min.io.pretrained import from_pretrained
    model = from_pretrained("weights/stage-toy")      # a folder, an official STAGE file, or a hub id

The checks here are about files (a config can hold anything); the model itself is in ../model.py.
"""
import math
from dataclasses import fields
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel, T5Config, T5EncoderModel

from ..codec import Codec
from ..generate import SamplingConfig, fast_cpu_decode
from ..model import MusicGenLM
from ..pipeline import MusicGen
from ..text import TextEncoder
from .formats import read_checkpoint
from .loading import (MAX_TEXT_BYTES, LoadError, add_context_token, check_finite, check_regular, check_sizes, load_strict, renamed_weight_norm,
                      submodule_state)

MAX_WINDOW_SECONDS = 30.0  # a fixed window holds context, separator and stem in MusicGen's 30 s of positions


def from_pretrained(name: str, device="cpu", dtype=torch.float32, stage: bool = False, t5: str | None = None) -> MusicGen:
    """Any checkpoint layout (formats.py): a transformers, stage_min or audiocraft folder, an official
    STAGE checkpoint file, or a hub id such as facebook/musicgen-small. `t5`: t5-base's folder or hub
    id, for the layouts that do not bundle it. With `stage`, a plain MusicGen gets the STAGE context
    token (a STAGE checkpoint already has it)."""
    ckpt = read_checkpoint(name, t5=t5)
    lm_state, cfg = ckpt.lm_state, ckpt.lm_cfg
    context_token_added = stage and cfg.n_special < 2
    if context_token_added:
        lm_state, cfg = add_context_token(lm_state, cfg)
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        lm = MusicGenLM(cfg)
    load_strict(lm, lm_state, "LM weights", assign=True)
    check_finite(lm, f"{name}: LM")
    text_encoder = load_text_encoder(ckpt.spiece_dir, ckpt.config, ckpt.state)
    codec = load_codec(ckpt.config, ckpt.state)
    model = MusicGen(lm, text_encoder, codec, sampling=recommended_sampling(ckpt.config.get("sampling"), name),
                     window_frames=window_frames(ckpt.config.get("window_seconds"), codec.frame_rate, name))
    model = model.to(device).eval()
    model.lm.to(dtype)  # only the LM: T5 overflows in fp16, and the codec runs once, so both stay fp32
    fast_cpu_decode(model.lm)  # CPU decode steps stream the weights faster (a no-op elsewhere)
    model.context_token_added = context_token_added  # an untrained row: the stem will not follow a context
    model.layout = ckpt.layout
    return model


def window_frames(seconds, frame_rate: float, name: str) -> int | None:
    """config.json's optional "window_seconds" (a model trained on one fixed window, the toy) in frames."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_WINDOW_SECONDS \
            or round(seconds * frame_rate) < 1:
        raise LoadError(f"{name}: config.json's 'window_seconds' must be a number of seconds in (0, {MAX_WINDOW_SECONDS:g}], "
                        f"got {seconds!r}")
    return round(float(seconds) * frame_rate)


def recommended_sampling(section, name: str) -> SamplingConfig:
    """config.json's optional "sampling" object: the settings a model was measured best with (the toy's
    temperature), in SamplingConfig's names; the others keep their defaults."""
    if section is None:
        return SamplingConfig()
    whole = {f.name: f.type in (int, "int") for f in fields(SamplingConfig)}  # top_k: int; the others: float
    if not isinstance(section, dict) or not set(section) <= set(whole):
        raise LoadError(f"{name}: config.json's 'sampling' must be an object with some of {', '.join(whole)}, got {section!r}")
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, int if whole[key] else (int, float)) or not math.isfinite(value):
            raise LoadError(f"{name}: config.json's 'sampling' {key}={value!r} is not a finite {'whole ' if whole[key] else ''}number")
    sampling = SamplingConfig(**{k: v if whole[k] else float(v) for k, v in section.items()})
    try:
        sampling.check()
    except ValueError as e:
        raise LoadError(f"{name}: config.json's 'sampling': {e}") from None
    return sampling


def load_text_encoder(folder: Path, config: dict, state: dict) -> TextEncoder:
    spiece = folder / "spiece.model"
    if not spiece.exists():
        raise LoadError(f"{folder} has no spiece.model (t5-base's sentencepiece model); copy it there from t5-base")
    if check_regular(spiece).st_size > MAX_TEXT_BYTES:  # a FIFO or /dev/zero would hang sentencepiece's read
        raise LoadError(f"{spiece} is over {MAX_TEXT_BYTES >> 20} MiB: not a sentencepiece model (t5-base's is 0.8 MiB)")
    t5_config = _sub_config(T5Config, config, "text_encoder")
    try:
        t5 = T5EncoderModel(t5_config)
    except Exception as e:  # settings from_dict accepts but the model cannot be built with
        raise LoadError(f"config.json's 'text_encoder' section describes no valid T5 ({type(e).__name__}: {e})") from None
    sub = submodule_state(state, "text_encoder.")
    # T5 ties shared.weight and encoder.embed_tokens.weight; files often store only one of them
    for have, need in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if have in sub and need not in sub:
            sub[need] = sub[have]
    load_strict(t5, sub, "text encoder (T5) weights")
    try:
        return TextEncoder(spiece, t5)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse error
        raise LoadError(f"{spiece}: not a sentencepiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _sub_config(kind, config: dict, part: str):
    """T5Config / EncodecConfig from a config section, checked enough that building the model
    cannot fail half-way with a Python error (a config file can hold anything)."""
    section = config.get(part)
    if not isinstance(section, dict):
        raise LoadError(f"config.json's '{part}' section is missing or not an object")
    try:
        sub = kind.from_dict(section)
    except Exception as e:
        raise LoadError(f"config.json's '{part}' section is not a valid {kind.__name__} ({type(e).__name__}: {e})") from None
    # upper limits far above t5-base / EnCodec 32 kHz, far below what would exhaust memory while building
    limits = (dict(d_model=16384, d_kv=4096, d_ff=131072, num_layers=256, num_heads=256, vocab_size=1 << 20)
              if part == "text_encoder" else
              dict(sampling_rate=384000, num_filters=4096, hidden_size=16384, codebook_size=1 << 20, codebook_dim=16384,
                   audio_channels=8, num_residual_layers=64, num_lstm_layers=64))
    check_sizes({name: getattr(sub, name, None) for name in limits}, limits, f"config.json's '{part}' section")
    if part == "text_encoder" and sub.num_layers * (4 * sub.d_model * sub.num_heads * sub.d_kv + 3 * sub.d_model * sub.d_ff) \
            + sub.vocab_size * sub.d_model > 20e9:
        raise LoadError(f"config.json's '{part}' section describes a T5 of over 20B parameters (t5-base has 0.1B)")
    if part == "audio_encoder":
        ratios, bandwidths = sub.upsampling_ratios, sub.target_bandwidths
        if (not isinstance(ratios, list) or not ratios or len(ratios) > 16
                or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 64 for r in ratios)
                or not isinstance(bandwidths, list) or not bandwidths
                or not all(isinstance(b, (int, float)) and b > 0 for b in bandwidths)):
            raise LoadError(f"config.json's '{part}' section: upsampling_ratios / target_bandwidths describe no valid codec")
        if sub.num_filters * 2 ** len(ratios) > 1 << 16 or sub.codebook_size * sub.codebook_dim > 1 << 26 \
                or len(bandwidths) > 64 or max(bandwidths) > 1000:
            raise LoadError(f"config.json's '{part}' section describes a codec far larger than EnCodec (num_filters, "
                            "upsampling_ratios, codebook_size x codebook_dim or target_bandwidths)")
    return sub


def load_codec(config: dict, state: dict) -> Codec:
    try:
        model = EncodecModel(_sub_config(EncodecConfig, config, "audio_encoder"))
    except LoadError:
        raise
    except Exception as e:  # settings from_dict accepts but the model cannot be built with
        raise LoadError(f"config.json's 'audio_encoder' section describes no valid codec ({type(e).__name__}: {e})") from None
    expected = model.state_dict()
    sub = renamed_weight_norm(submodule_state(state, "audio_encoder."), expected)
    for key in expected:  # the codebooks' EMA statistics only matter for training the codec: keep defaults if absent
        if key.endswith((".codebook.inited", ".codebook.cluster_size", ".codebook.embed_avg")) and key not in sub:
            sub[key] = expected[key]
    load_strict(model, sub, "codec (EnCodec) weights")
    return Codec(model)
