"""The three parts together: text encoder, language model, codec. Prompts in, audio out."""
from dataclasses import replace

import torch

from . import delay
from .codec import Codec
from .generate import SamplingConfig, compiled_step, generate_tokens, guidance_batch
from .model import MusicGenLM
from .stage import generation_rows
from .text import TextEncoder


class MusicGen(torch.nn.Module):
    def __init__(self, lm: MusicGenLM, text_encoder: TextEncoder, codec: Codec, sampling: SamplingConfig | None = None,
                 window_frames: int | None = None):
        """Loading a checkpoint of any layout into these parts: stage_min.io.pretrained.from_pretrained.
        sampling: used where a call gives none (a model's own settings, e.g. the toy's temperature).
        window_frames: a model trained on one fixed window (context as long as the stem, the toy)
        generates in that window; None for STAGE's variable prefix."""
        super().__init__()
        self.lm, self.text_encoder, self.codec = lm, text_encoder, codec
        self.sampling = sampling or SamplingConfig()
        self.window_frames = window_frames
        self.context_token_added = False  # True: an untrained context row (a plain MusicGen given stage=True)
        self.layout = "native"  # the file layout it was loaded from (io.formats.detect_layout)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

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
        window = self.window_frames
        if window and n_frames > window and self.lm.cfg.n_special >= 2:  # fixed-window STAGE: text alone in windows
            silence = [torch.zeros(n_frames * self.codec.hop) for _ in prompts]
            return self._in_windows(silence, prompts, sampling, seed, progress, compile, drop_context=True)
        K, special = self.lm.cfg.n_codebooks, self.lm.cfg.special_id
        if self.lm.cfg.n_special >= 2:
            no_context = torch.zeros(len(prompts), K, 0, dtype=torch.long, device=self.device)
            return self._stage_rows(no_context, torch.zeros(len(prompts), dtype=torch.long, device=self.device),
                                    prompts, n_frames, sampling, seed, progress, compile)
        B, valid = len(prompts), delay.valid_mask(K, n_frames, self.device)
        rows = (torch.full((B, K, n_frames + K), special, dtype=torch.long, device=self.device),
                ~valid.expand(B, K, n_frames + K))  # grid, known: the start step and the delay gaps are given
        grid, known = guidance_batch(rows, rows if sampling.cfg_coef != 1.0 else None)  # same rows, null text
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
                  progress: bool = False, compile: bool = False, whole_context: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """STAGE: one stem per context (mono audio at `sample_rate`, any lengths), each `n_frames`
        long and time-aligned with its context (stem frame t plays with context frame t).
        Contexts are encoded, cut to the stem's length, left-padded to a common length.
        whole_context: nothing is cut, every context is encoded whole (the original STAGE's inference:
        one stem on the whole song, however long; past 30 s in all, positions the base never saw).
        Returns stem audio (B, 1, samples) in fp32 and codes (B, K, n_frames). sampling None: the model's own."""
        if self.lm.cfg.n_special < 2:
            raise ValueError("this model has no context token; load it with stage=True or use a STAGE checkpoint")
        sampling = sampling or self.sampling
        sampling.check()
        n_out, window, hop = n_frames, None if whole_context else self.window_frames, self.codec.hop
        if window and n_frames > window:  # a model trained on one fixed window: longer stems in windows
            beds = [torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.float32)[:n_frames * hop],
                                            (0, max(0, n_frames * hop - len(c)))) for c in contexts]
            return self._in_windows(beds, prompts, sampling, seed, progress, compile)
        if window:  # the geometry it was trained on: context and stem one window long
            contexts = [torch.nn.functional.pad(torch.as_tensor(c, dtype=torch.float32)[:window * hop],
                                                (0, max(0, window * hop - len(c)))) for c in contexts]
            n_frames = window
        cfg = self.lm.cfg
        codes = [self.encode_context(c)[:, :, :None if whole_context else n_frames] for c in contexts]
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
