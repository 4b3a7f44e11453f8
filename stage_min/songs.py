"""Whole songs: a stem exactly as long as its song, generated window by window; stems stacked.

A song is accompanied in windows of `window_s` seconds that overlap by `overlap_s`. Each window is
STAGE's [context][separator][target] over one span of the song (stage.py), with that span's audio
encoded on its own as in training. The first part of its target, the overlap, is the stem the
previous window generated, given as known tokens; only the rest is sampled. The last window is moved
back to end on the song's end, so every window of a long song is as long as the training windows.
The song is zero-padded to whole frames and the stem cut back to its sample count. Codes are decoded
once at the end (in long chunks with margins, so memory stays bounded): windows leave no seam.

Stacking runs one STAGE model per stem, in order; each stem's context is the song plus the stems
made before it (in training the context is a sum of the other stems).
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from . import delay
from .generate import SamplingConfig, compiled_step, generate_tokens
from .stage import generation_rows


def plan_windows(n_frames: int, n_given: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """(start, first sampled frame, end) of each window, in frames. Frames before the first sampled
    one are given: the overlap with the previous window, or a continuation."""
    if not 0 <= overlap < window:
        raise ValueError(f"the overlap must be >= 0 and shorter than the window, got {overlap} and {window} frames")
    windows, done = [], n_given
    while done < n_frames:
        start = max(0, min(done - overlap, n_frames - window))
        end = min(n_frames, start + window)
        windows.append((start, done, end))
        done = end
    return windows


def decode_long(codec, codes: torch.Tensor, chunk: int = 3000, margin: int = 100) -> torch.Tensor:
    """codes (K, frames) -> audio (frames * hop,) on the CPU. Up to `chunk` frames (60 s) in one
    decode; longer songs in chunks decoded with `margin` frames of codes on each side, of which only
    the middle is kept, so memory does not grow with the song."""
    K, F = codes.shape
    hop = codec.hop
    pieces = []
    for a in range(0, F, chunk):
        b = min(F, a + chunk)
        lo, hi = (a, b) if F <= chunk else (max(0, a - margin), min(F, b + margin))
        audio = codec.decode(codes[None, :, lo:hi])[0, 0].float().cpu()
        pieces.append(audio[(a - lo) * hop:(b - lo) * hop])
    return torch.cat(pieces)


def _as_numpy(audio) -> np.ndarray:
    audio = np.asarray(torch.as_tensor(audio).detach().float().cpu())
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"a song is mono audio of shape (samples,), got shape {audio.shape}")
    return audio


@torch.no_grad()
def encode_contexts(codec, audios: list, special: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Context audios (whole frames each) -> codes (B, K, C) right-aligned and lengths (B,).
    Contexts of equal length are encoded as one batch; no row is ever padded with silence before
    encoding, so each row's codes are exactly those of encoding it alone (as at inference)."""
    lengths = [len(a) // codec.hop for a in audios]
    C = max(lengths)
    out = torch.full((len(audios), codec.n_codebooks, C), special, dtype=torch.long, device=device)
    for n in sorted(set(lengths)):
        rows = [i for i, m in enumerate(lengths) if m == n]
        x = torch.from_numpy(np.stack([audios[i][: n * codec.hop] for i in rows])).to(device)[:, None]
        codes = codec.encode(x)[..., :n]
        out[rows, :, C - n:] = codes.long()
    return out, torch.tensor(lengths, device=device)


def _window_rows(model, songs, stems, windows, guidance, drop_context=False):
    """generation_rows for one round: row j is window windows[j] of song songs[j] (whole frames).
    drop_context: every context removed, as in training's dropped-context rows (the text-only baseline)."""
    cfg, hop = model.lm.cfg, model.codec.hop
    n_target = max(end - start for start, _, end in windows)
    context, lengths = encode_contexts(model.codec, [s[start * hop:end * hop] for s, (start, _, end) in zip(songs, windows)],
                                       cfg.special_id, model.device)
    if drop_context:
        lengths = torch.zeros_like(lengths)
    given = torch.full((len(songs), cfg.n_codebooks, n_target), cfg.special_id, dtype=torch.long, device=model.device)
    for j, (stem, (start, done, _)) in enumerate(zip(stems, windows)):
        given[j, :, :done - start] = stem[:, start:done]
    return generation_rows(context, lengths, n_target, cfg.special_id, cfg.context_id, guidance, given)


@torch.no_grad()
def accompany_songs(model, songs: list, prompts: list[str], window_s: float = 10.0, overlap_s: float = 5.0,
                    continuations: list | None = None, sampling: SamplingConfig | None = None,
                    seed: int | None = None, progress: bool = False, compile: bool = False,
                    on_window=None, drop_context: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One stem per song (mono audio at model.sample_rate, any lengths), each exactly as long as its
    song. The songs are batched: round r runs every song's r-th window as one batch of rows.
    continuations: per song None or a stem's first part (audio), kept and continued.
    on_window(round, rows, windows, frames): called after each round (tests, logging).
    drop_context: the songs only set the length; the stems follow the text alone (a baseline).
    Returns per song (audio (samples,) fp32 on the CPU, codes (K, frames))."""
    if model.lm.cfg.n_special < 2:
        raise ValueError("this model has no context token; load it with stage=True or use a STAGE checkpoint")
    sampling = sampling or getattr(model, "sampling", None) or SamplingConfig()  # the model's own by default
    sampling.check()
    cfg, hop, rate = model.lm.cfg, model.codec.hop, model.codec.frame_rate
    window, overlap = round(window_s * rate), round(overlap_s * rate)
    fixed = getattr(model, "window_frames", None)
    if fixed:  # a model trained on one fixed window (the toy) only knows that geometry: half of it overlaps
        window, overlap = fixed, fixed // 2
    songs = [_as_numpy(s) for s in songs]
    n_samples = [len(s) for s in songs]
    n_frames = [max(math.ceil(n / hop), fixed or 0) for n in n_samples]  # a short song is padded to the window
    songs = [np.pad(s, (0, f * hop - len(s))).astype(np.float32) for s, f in zip(songs, n_frames)]
    stems = [torch.full((cfg.n_codebooks, f), cfg.special_id, dtype=torch.long, device=model.device) for f in n_frames]
    n_given = [0] * len(songs)
    for i, audio in enumerate(continuations or []):
        if audio is not None:
            codes = model.encode_context(torch.as_tensor(audio))[0, :, :n_frames[i]]
            stems[i][:, :codes.shape[-1]] = codes
            n_given[i] = codes.shape[-1]
    plans = [plan_windows(f, g, window, overlap) for f, g in zip(n_frames, n_given)]

    text, text_mask = model.text_condition(prompts)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    step_fn = compiled_step(model.lm) if compile else None
    bar = tqdm(total=sum(f - g for f, g in zip(n_frames, n_given)), disable=not progress, desc="generating the stem", unit="frame")
    for r in range(max(map(len, plans), default=0)):
        rows = [i for i, plan in enumerate(plans) if r < len(plan)]
        windows = [plans[i][r] for i in rows]
        grid, known, keep, C = _window_rows(model, [songs[i] for i in rows], [stems[i] for i in rows], windows,
                                            sampling.cfg_coef != 1.0, drop_context)
        out = generate_tokens(model.lm, grid, known, text[rows], text_mask[rows], sampling, keep=keep,
                              generator=generator, step_fn=step_fn, free_cache=not compile)
        frames = delay.deinterleave(out)[:, :, C + 1:]  # the target frames of each row
        for j, (i, (start, done, end)) in enumerate(zip(rows, windows)):
            stems[i][:, done:end] = frames[j, :, done - start:end - start]
            bar.update(end - done)
        if on_window is not None:
            on_window(r, rows, windows, frames)
    bar.close()
    return [(decode_long(model.codec, stem)[:n], stem[:, :math.ceil(n / hop)]) for stem, n in zip(stems, n_samples)]


def accompany_song(model, song, prompt: str = "", window_s: float = 10.0, overlap_s: float = 5.0,
                   continuation=None, sampling: SamplingConfig | None = None, seed: int | None = None,
                   progress: bool = False, compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One song (mono audio (samples,) at model.sample_rate, any length) -> its stem, exactly as long:
    (audio (samples,) fp32 on the CPU, codes (K, frames)). continuation: the stem's first part."""
    return accompany_songs(model, [song], [prompt], window_s, overlap_s, [continuation], sampling, seed, progress,
                           compile)[0]


def stack_songs(models: dict, songs: list, prompts: list[str], window_s: float = 10.0, overlap_s: float = 5.0,
                sampling: SamplingConfig | None = None, seed: int | None = None, progress: bool = False,
                compile: bool = False) -> list[tuple[dict, torch.Tensor]]:
    """models: stem name -> STAGE MusicGen, in the order the stems are made. Each stem accompanies the
    song plus the stems before it. Returns per song ({stem: audio (samples,)}, mix = song + stems)."""
    beds = [torch.as_tensor(_as_numpy(s)).clone() for s in songs]
    out = [{} for _ in songs]
    for n, (name, model) in enumerate(models.items()):
        stems = accompany_songs(model, beds, prompts, window_s, overlap_s, None, sampling,
                                None if seed is None else seed + n, progress, compile)
        for i, (audio, _) in enumerate(stems):
            out[i][name] = audio
            beds[i] = beds[i] + audio
    return list(zip(out, beds))


def stack(models: dict, song, prompt: str = "", **kwargs) -> tuple[dict, torch.Tensor]:
    """One song -> ({stem: audio} for each stem of `models`, in order; the mix). See stack_songs."""
    return stack_songs(models, [song], [prompt], **kwargs)[0]
