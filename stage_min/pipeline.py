"""The three parts together: text encoder, language model, codec. Prompts in, audio out."""
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel, T5Config, T5EncoderModel

from . import delay
from .codec import Codec
from .generate import SamplingConfig, compiled_step, generate_tokens
from .loading import (LoadError, add_context_token, is_native, lm_config_from_native, load_strict, lm_config_from_hf, lm_state_from_hf, read_config, read_state_dict,
                      renamed_weight_norm, resolve_model_dir, submodule_state)
from .model import MusicGenLM
from .text import TextEncoder


class MusicGen(torch.nn.Module):
    def __init__(self, lm: MusicGenLM, text_encoder: TextEncoder, codec: Codec):
        super().__init__()
        self.lm, self.text_encoder, self.codec = lm, text_encoder, codec

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @classmethod
    def from_pretrained(cls, name: str, device="cpu", dtype=torch.float32, stage: bool = False) -> "MusicGen":
        """A transformers-layout folder or a hub id such as facebook/musicgen-small. With `stage`,
        a plain MusicGen gets the STAGE context token (a STAGE checkpoint already has it)."""
        folder = resolve_model_dir(name)
        config, state = read_config(folder), read_state_dict(folder)
        if is_native(config):
            cfg = lm_config_from_native(config)
            lm_state = submodule_state(state, "lm.")
            if "text_encoder" not in config or "audio_encoder" not in config:  # T5 + EnCodec come from the base model
                if not config.get("base"):
                    raise LoadError(f"{folder}/config.json names no base model for the text encoder and codec")
                folder = resolve_model_dir(config["base"])
                config, state = read_config(folder), read_state_dict(folder)
        else:
            cfg = lm_config_from_hf(config, state)
            lm_state = lm_state_from_hf(state, cfg)
        if stage:
            lm_state, cfg = add_context_token(lm_state, cfg)
        with torch.device("meta"):  # no random init of weights that are overwritten anyway
            lm = MusicGenLM(cfg)
        load_strict(lm, lm_state, "LM weights", assign=True)
        model = cls(lm, load_text_encoder(folder, config, state), load_codec(config, state)).to(device).eval()
        model.lm.to(dtype)  # only the LM: T5 overflows in fp16, and the codec is run once, so both stay fp32
        return model

    def text_condition(self, prompts: list[str]):
        """Prompts -> projected text states (B, L, dim) and mask (B, L)."""
        states, mask = self.text_encoder(prompts)
        states = states.to(self.device, next(self.lm.parameters()).dtype)
        return self.lm.project_text(states, mask.to(self.device)), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], n_frames: int, sampling: SamplingConfig | None = None,
                 seed: int | None = None, progress: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-music. Returns audio (B, 1, samples) in fp32 and codes (B, K, n_frames).
        compile: torch.compile the decode step (pays from the second generation of the same size)."""
        sampling = sampling or SamplingConfig()
        sampling.check()
        K, special = self.lm.cfg.n_codebooks, self.lm.cfg.special_id
        R = len(prompts) * (2 if sampling.cfg_coef != 1.0 else 1)  # rows: conditional (+ unconditional)
        valid = delay.valid_mask(K, n_frames, self.device)
        grid = torch.full((R, K, n_frames + K), special, dtype=torch.long, device=self.device)
        known = ~valid.expand(R, K, n_frames + K)  # the start step and the delay gaps are given
        text, text_mask = self.text_condition(prompts)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        step_fn = compiled_step(self.lm) if compile else None
        grid = generate_tokens(self.lm, grid, known, text, text_mask, sampling, generator=generator, progress=progress,
                               step_fn=step_fn, free_cache=not compile)
        codes = delay.deinterleave(grid)
        return self.codec.decode(codes).float(), codes


def load_text_encoder(folder: Path, config: dict, state: dict) -> TextEncoder:
    spiece = folder / "spiece.model"
    if not spiece.exists():
        raise LoadError(f"{folder} has no spiece.model (t5-base's sentencepiece model); copy it there from t5-base")
    t5 = T5EncoderModel(T5Config.from_dict(config["text_encoder"]))
    sub = submodule_state(state, "text_encoder.")
    if "encoder.embed_tokens.weight" not in sub and "shared.weight" in sub:
        sub["encoder.embed_tokens.weight"] = sub["shared.weight"]  # tied in T5, stored once
    load_strict(t5, sub, "text encoder (T5) weights")
    return TextEncoder(spiece, t5)


def load_codec(config: dict, state: dict) -> Codec:
    model = EncodecModel(EncodecConfig.from_dict(config["audio_encoder"]))
    sub = renamed_weight_norm(submodule_state(state, "audio_encoder."), model.state_dict())
    load_strict(model, sub, "codec (EnCodec) weights")
    return Codec(model)
