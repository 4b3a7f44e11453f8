"""The three parts together: text encoder, language model, codec. Prompts in, audio out."""
import math
from dataclasses import fields, replace
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel, T5Config, T5EncoderModel

from . import delay
from .codec import Codec
from .formats import read_checkpoint
from .generate import SamplingConfig, compiled_step, generate_tokens
from .loading import LoadError, add_context_token, check_finite, load_strict, renamed_weight_norm, submodule_state
from .model import MusicGenLM
from .stage import generation_rows
from .text import TextEncoder


class MusicGen(torch.nn.Module):
    def __init__(self, lm: MusicGenLM, text_encoder: TextEncoder, codec: Codec):
        super().__init__()
        self.lm, self.text_encoder, self.codec = lm, text_encoder, codec
        self.sampling = SamplingConfig()  # used where no sampling is given; from_pretrained: the model's own

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @classmethod
    def from_pretrained(cls, name: str, device="cpu", dtype=torch.float32, stage: bool = False, t5: str | None = None) -> "MusicGen":
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
        model = cls(lm, text_encoder, load_codec(ckpt.config, ckpt.state)).to(device).eval()
        model.lm.to(dtype)  # only the LM: T5 overflows in fp16, and the codec runs once, so both stay fp32
        model.context_token_added = context_token_added  # an untrained row: the stem will not follow a context
        model.layout = ckpt.layout  # which file layout it came from (formats.detect_layout)
        # a model trained on one fixed window (context as long as the stem, e.g. the toy) generates in it
        window = ckpt.config.get("window_seconds")
        model.window_frames = round(float(window) * model.codec.frame_rate) if window else None
        model.sampling = recommended_sampling(ckpt.config.get("sampling"), name)
        return model

    def sampling_with(self, **given) -> SamplingConfig:
        """The model's sampling (its config.json's "sampling", else SamplingConfig's defaults) with the
        settings in `given` that are not None (what a user asked for) in their place."""
        return replace(self.sampling, **{k: v for k, v in given.items() if v is not None})

    def text_condition(self, prompts: list[str]):
        """Prompts -> projected text states (B, L, dim) and mask (B, L)."""
        states, mask = self.text_encoder(prompts)
        states = states.to(self.device, next(self.lm.parameters()).dtype)
        return self.lm.project_text(states, mask.to(self.device)), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], n_frames: int, sampling: SamplingConfig | None = None,
                 seed: int | None = None, progress: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-music. Returns audio (B, 1, samples) in fp32 and codes (B, K, n_frames).
        compile: torch.compile the decode step (pays from the second generation of the same size).
        A STAGE model (with a context token) gets `[separator][target]`, no context frames, in both
        guidance halves: what the original STAGE builds for context=None, and what every training
        row with a dropped context looks like. A plain MusicGen gets its own grid.
        sampling None: the model's own (`self.sampling`)."""
        sampling = sampling or self.sampling
        sampling.check()
        window = getattr(self, "window_frames", None)
        if window and n_frames > window and self.lm.cfg.n_special >= 2:  # fixed-window STAGE: text alone in windows
            silence = [torch.zeros(n_frames * self.codec.hop) for _ in prompts]
            return self._in_windows(silence, prompts, sampling, seed, progress, compile, drop_context=True)
        K, special = self.lm.cfg.n_codebooks, self.lm.cfg.special_id
        if self.lm.cfg.n_special >= 2:
            no_context = torch.zeros(len(prompts), K, 0, dtype=torch.long, device=self.device)
            return self._stage_rows(no_context, torch.zeros(len(prompts), dtype=torch.long, device=self.device),
                                    prompts, n_frames, sampling, seed, progress, compile)
        R = len(prompts) * (2 if sampling.cfg_coef != 1.0 else 1)  # rows: conditional (+ unconditional)
        valid = delay.valid_mask(K, n_frames, self.device)
        grid = torch.full((R, K, n_frames + K), special, dtype=torch.long, device=self.device)
        known = ~valid.expand(R, K, n_frames + K)  # the start step and the delay gaps are given
        codes = delay.deinterleave(self._fill(prompts, grid, known, None, sampling, seed, progress, compile))
        return self.codec.decode(codes).float(), codes

    def _fill(self, prompts, grid, known, keep, sampling, seed, progress, compile):
        """Text-condition and sample the unknown tokens of the grid (see generate_tokens)."""
        text, text_mask = self.text_condition(prompts)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        step_fn = compiled_step(self.lm) if compile else None
        return generate_tokens(self.lm, grid, known, text, text_mask, sampling, keep=keep, generator=generator,
                               progress=progress, step_fn=step_fn, free_cache=not compile)

    @torch.no_grad()
    def accompany(self, contexts: list[torch.Tensor], prompts: list[str], n_frames: int,
                  sampling: SamplingConfig | None = None, seed: int | None = None,
                  progress: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """STAGE: one stem per context (mono audio at `sample_rate`, any lengths), each `n_frames`
        long and time-aligned with its context (stem frame t plays with context frame t).
        Contexts are encoded, cut to the stem's length, left-padded to a common length.
        Returns stem audio (B, 1, samples) in fp32 and codes (B, K, n_frames). sampling None: the model's own."""
        if self.lm.cfg.n_special < 2:
            raise ValueError("this model has no context token; load it with stage=True or use a STAGE checkpoint")
        sampling = sampling or self.sampling
        sampling.check()
        n_out, window, hop = n_frames, getattr(self, "window_frames", None), self.codec.hop
        if window and n_frames > window:  # a model trained on one fixed window: longer stems in windows
            beds = [torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.float32)[:n_frames * hop],
                                            (0, max(0, n_frames * hop - len(c)))) for c in contexts]
            return self._in_windows(beds, prompts, sampling, seed, progress, compile)
        if window:  # the geometry it was trained on: context and stem one window long
            contexts = [torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.float32)[:window * hop],
                                                (0, max(0, window * hop - len(c)))) for c in contexts]
            n_frames = window
        cfg = self.lm.cfg
        codes = [self.encode_context(c)[:, :, :n_frames] for c in contexts]
        lengths = torch.tensor([c.shape[-1] for c in codes], device=self.device)
        context = torch.stack([torch.nn.functional.pad(c[0], (int(lengths.max()) - c.shape[-1], 0), value=cfg.special_id) for c in codes])
        return self._stage_rows(context, lengths, prompts, n_frames, sampling, seed, progress, compile, n_out)

    def _in_windows(self, beds, prompts, sampling, seed, progress, compile, drop_context=False):
        """Stems as long as `beds` (audio), made in the model's fixed window (songs.py); batched as
        generate/accompany return them: audio (B, 1, samples), codes (B, K, frames)."""
        from .songs import accompany_songs

        out = accompany_songs(self, beds, prompts, sampling=sampling, seed=seed, progress=progress, compile=compile,
                              drop_context=drop_context)
        return torch.stack([a for a, _ in out])[:, None], torch.stack([c for _, c in out])

    def _stage_rows(self, context, lengths, prompts, n_frames, sampling, seed, progress, compile, n_out=None):
        """`[context][separator][stem]` rows (context (B, K, C) right-aligned, C may be 0) -> the stem's
        first n_out frames (default all n_frames: a fixed-window model fills its window, then is cut)."""
        cfg, n_out = self.lm.cfg, n_out or n_frames
        grid, known, keep, C = generation_rows(context, lengths, n_frames, cfg.special_id, cfg.context_id,
                                               guidance=sampling.cfg_coef != 1.0)
        grid = self._fill(prompts, grid, known, keep, sampling, seed, progress, compile)
        stem_codes = delay.deinterleave(grid)[:, :, C + 1:C + 1 + n_out]  # drop the context and separator frames
        return self.codec.decode(stem_codes).float(), stem_codes

    def encode_context(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono audio (samples,) -> codes (1, K, frames); cut to whole frames first."""
        hop = self.codec.hop
        audio = torch.as_tensor(audio, dtype=torch.float32)
        if audio.dim() != 1:
            raise ValueError(f"a context is mono audio of shape (samples,), got shape {tuple(audio.shape)}")
        audio = audio[: (audio.shape[-1] // hop) * hop]
        if audio.numel() == 0:
            raise ValueError(f"context shorter than one frame ({hop} samples)")
        dtype = next(self.codec.parameters()).dtype
        return self.codec.encode(audio.to(self.device, dtype)[None, None])


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
    sizes = (["d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"] if part == "text_encoder" else
             ["sampling_rate", "num_filters", "hidden_size", "codebook_size", "codebook_dim", "audio_channels"])
    for name in sizes:
        value = getattr(sub, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LoadError(f"config.json's '{part}' section: {name}={value!r} describes no valid model")
    if part == "audio_encoder":
        ratios, bandwidths = sub.upsampling_ratios, sub.target_bandwidths
        if (not isinstance(ratios, list) or not ratios or not all(isinstance(r, int) and r >= 1 for r in ratios)
                or not isinstance(bandwidths, list) or not bandwidths
                or not all(isinstance(b, (int, float)) and b > 0 for b in bandwidths)):
            raise LoadError(f"config.json's '{part}' section: upsampling_ratios / target_bandwidths describe no valid codec")
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
