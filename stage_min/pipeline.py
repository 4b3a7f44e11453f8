"""The three parts together: text encoder, language model, codec. Prompts in, audio out."""
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel, T5Config, T5EncoderModel

from . import delay
from .codec import Codec
from .generate import SamplingConfig, generate_tokens
from .formats import read_checkpoint
from .loading import LoadError, add_context_token, load_strict, renamed_weight_norm, submodule_state
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
    def from_pretrained(cls, name: str, device="cpu", dtype=torch.float32, stage: bool = False, t5: str | None = None) -> "MusicGen":
        """Any checkpoint layout (formats.py): a transformers, stage_min or audiocraft folder, an official
        STAGE checkpoint file, or a hub id such as facebook/musicgen-small. `t5`: t5-base's folder or hub
        id, for the layouts that do not bundle it. With `stage`, a plain MusicGen gets the STAGE context
        token (a STAGE checkpoint already has it)."""
        ckpt = read_checkpoint(name, t5=t5)
        lm_state, cfg = ckpt.lm_state, ckpt.lm_cfg
        if stage:
            lm_state, cfg = add_context_token(lm_state, cfg)
        with torch.device("meta"):  # no random init of weights that are overwritten anyway
            lm = MusicGenLM(cfg)
        load_strict(lm, lm_state, "LM weights", assign=True)
        text_encoder = load_text_encoder(ckpt.spiece_dir, ckpt.config, ckpt.state)
        return cls(lm, text_encoder, load_codec(ckpt.config, ckpt.state)).to(device, dtype).eval()

    def text_condition(self, prompts: list[str]):
        """Prompts -> projected text states (B, L, dim) and mask (B, L)."""
        states, mask = self.text_encoder(prompts)
        states = states.to(self.device, next(self.lm.parameters()).dtype)
        return self.lm.project_text(states, mask.to(self.device)), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], n_frames: int, sampling: SamplingConfig | None = None,
                 seed: int | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-to-music. Returns audio (B, 1, samples) in fp32 and codes (B, K, n_frames)."""
        sampling = sampling or SamplingConfig()
        sampling.check()
        K, special = self.lm.cfg.n_codebooks, self.lm.cfg.special_id
        R = len(prompts) * (2 if sampling.cfg_coef != 1.0 else 1)  # rows: conditional (+ unconditional)
        valid = delay.valid_mask(K, n_frames, self.device)
        grid = torch.full((R, K, n_frames + K), special, dtype=torch.long, device=self.device)
        known = ~valid.expand(R, K, n_frames + K)  # the start step and the delay gaps are given
        text, text_mask = self.text_condition(prompts)
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        grid = generate_tokens(self.lm, grid, known, text, text_mask, sampling, generator=generator, progress=progress)
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
