"""A small EnCodec-architecture codec trained on synthetic stems: the toy model's ears.

MusicGen's codec (EnCodec 32 kHz, 4 codebooks, 50 frames/s) cannot be downloaded here, and a random
one hears nothing (every frame gets the same code). This trains one of the same architecture
(transformers' `EncodecModel`), only much smaller, in three steps (docs/original.md#toy-codec):

1. an autoencoder with the quantiser bypassed: waveform L1 plus a multi-resolution STFT loss
   (auraloss's, a maintained implementation);
2. residual k-means on the encoder's latents (scipy's kmeans2): one codebook per level, each fitted
   on what the levels before it leave;
3. a short fine-tune of the decoder on quantised latents, so that it learns to undo the rounding.

Training audio is drawn in memory from `stage_min.toy.synth` (drums, bass, chords, their mixes) and
click tracks, the four kinds of sound the toy STAGE hears or plays.
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import EncodecConfig, EncodecModel

from . import synth
from ..io.metronome import click_track

SAMPLE_RATE = 32000


@dataclass
class CodecTrainConfig:
    num_filters: int = 8  # SEANet width (MusicGen's: 64)
    hidden_size: int = 32  # latent size (MusicGen's: 128)
    codebook_size: int = 256  # codes per level (MusicGen's: 2048)
    lstm_layers: int = 1
    songs: int = 64  # synthetic songs of `song_seconds` to train on, drawn in memory
    song_seconds: float = 8.0
    steps: int = 900  # autoencoder steps
    finetune_steps: int = 200  # decoder steps on quantised latents
    batch_size: int = 8
    crop_seconds: float = 1.0
    lr: float = 1e-3
    kmeans_frames: int = 30000  # latent frames the codebooks are fitted on
    seed: int = 0
    check_songs: int = 16  # held-out songs (seed CHECK_SEED) the trained codec is measured on (codec_report)


def codec_config(cfg: CodecTrainConfig) -> EncodecConfig:
    """MusicGen's codec layout (32 kHz mono, hop 640 = 50 frames/s, 4 levels), smaller."""
    bits = math.log2(cfg.codebook_size)
    return EncodecConfig(
        sampling_rate=SAMPLE_RATE, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[4 * bits * 50 / 1000],  # exactly 4 codebooks
        num_filters=cfg.num_filters, hidden_size=cfg.hidden_size, codebook_size=cfg.codebook_size,
        codebook_dim=cfg.hidden_size, num_lstm_layers=cfg.lstm_layers, use_causal_conv=False, normalize=False,
        pad_mode="reflect", chunk_length_s=None, overlap=None,
    )


def training_audio(n_songs: int, seconds: float, seed: int, style: synth.Style = synth.TOY_GM) -> list[np.ndarray]:
    """Clips of every kind the toy model meets: each stem, the context mix, the full mix, clicks."""
    rng = np.random.default_rng(seed)
    clips = []
    for song in synth.make_songs(rng, n_songs, seconds, SAMPLE_RATE, style):
        times = np.array([t for t, _ in song["beats"]])
        down = np.array([p == 1 for _, p in song["beats"]])
        clicks = click_track(times, seconds, sample_rate=SAMPLE_RATE, downbeats=down)
        accomp = song["bass"] + song["chords"]
        clips += [song["drums"], song["bass"], song["chords"], accomp, accomp + song["drums"], clicks]
    return [np.clip(c, -1, 1).astype(np.float32) for c in clips]


def random_crops(clips, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    out = np.zeros((n, 1, length), dtype=np.float32)
    for i in range(n):
        clip = clips[int(rng.integers(len(clips)))]
        start = int(rng.integers(0, len(clip) - length + 1))
        out[i, 0] = clip[start:start + length]
    return torch.from_numpy(out)


def reconstruction_loss(decoded: torch.Tensor, audio: torch.Tensor, stft_loss) -> torch.Tensor:
    decoded = decoded[..., :audio.shape[-1]]
    return (decoded - audio).abs().mean() + stft_loss(decoded, audio)


def stft_loss_fn():
    import auraloss  # training-only dependency

    # spectral convergence + log magnitudes, with a power floor of 1e-5 (-100 dB of a full-scale bin):
    # synthetic stems hold digital silence, whose log magnitude at the default floor (1e-8) would
    # outweigh everything audible. (A linear-magnitude term made onsets worse: 0.88 vs 0.95 onset F1
    # after 200 steps.) The level comes out low; `calibrate_level` fixes it after training.
    return auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[2048, 1024, 512, 256], hop_sizes=[512, 256, 128, 64],
                                                 win_lengths=[2048, 1024, 512, 256], eps=1e-5)


def _fit(model: EncodecModel, clips, cfg: CodecTrainConfig, params, latents_of, steps: int, lr: float, seed: int,
         label: str, log=print):
    """Adam on `params` for `steps` batches of random crops: decoder(latents_of(audio)) vs audio."""
    rng = np.random.default_rng(seed)
    stft = stft_loss_fn()
    opt = torch.optim.Adam(params, lr=lr)
    length = int(cfg.crop_seconds * SAMPLE_RATE)
    t0 = time.time()
    for step in range(1, steps + 1):
        audio = random_crops(clips, cfg.batch_size, length, rng)
        loss = reconstruction_loss(model.decoder(latents_of(audio)), audio, stft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"codec {label} step {step}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")


def train_autoencoder(model: EncodecModel, clips, cfg: CodecTrainConfig, log=print):
    """Step 1: encoder -> decoder with no quantiser."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    _fit(model, clips, cfg, params, model.encoder, cfg.steps, cfg.lr, cfg.seed, "autoencoder", log)


@torch.no_grad()
def fit_codebooks(model: EncodecModel, clips, cfg: CodecTrainConfig, log=print):
    """Step 2: residual k-means; each level is fitted on the residual the levels before it leave."""
    from scipy.cluster.vq import kmeans2

    latents = torch.cat([model.encoder(torch.from_numpy(c)[None, None])[0].T for c in clips])  # (frames, dim)
    g = torch.Generator().manual_seed(cfg.seed)
    latents = latents[torch.randperm(len(latents), generator=g)[:cfg.kmeans_frames]].double()
    scale = latents.norm(dim=1).mean()
    residual = latents
    for level, layer in enumerate(model.quantizer.layers):
        centres, _ = kmeans2(residual.numpy(), cfg.codebook_size, iter=20, minit="++", seed=cfg.seed + level)
        centres = torch.from_numpy(centres)
        residual = residual - centres[torch.cdist(residual, centres).argmin(1)]
        book = layer.codebook
        book.embed.copy_(centres.float())
        book.embed_avg.copy_(centres.float())
        book.cluster_size.fill_(1.0)
        book.inited.fill_(1.0)
        log(f"codebook {level}: relative residual {residual.norm(dim=1).mean() / scale:.3f}")


def quantised_latents(model: EncodecModel, audio: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        latents = model.encoder(audio)
        n_q = model.config.num_quantizers
        codes = model.quantizer.encode(latents, bandwidth=max(model.config.target_bandwidths))
        assert codes.shape[0] == n_q
        return model.quantizer.decode(codes)


def finetune_decoder(model: EncodecModel, clips, cfg: CodecTrainConfig, log=print):
    """Step 3: the decoder learns to undo the quantiser's rounding (encoder and codebooks fixed)."""
    _fit(model, clips, cfg, list(model.decoder.parameters()), lambda audio: quantised_latents(model, audio),
         cfg.finetune_steps, cfg.lr / 3, cfg.seed + 1, "decoder fine-tune", log)


@torch.no_grad()
def init_codec(model: EncodecModel):
    """Zero conv biases and unit weight-norm gains. A fresh EncodecModel passes almost nothing through:
    each conv shrinks its input about 1/sqrt(3) and the biases dominate, so its latents barely vary
    (std 0.001 on a drum stem) and training settles on near-silence; with unit gains every conv keeps
    the variance of its input (latent std 0.25)."""
    for module in list(model.encoder.modules()) + list(model.decoder.modules()):
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            if module.bias is not None:
                module.bias.zero_()
            for name, p in module.named_parameters():
                if name.endswith("original0") or name == "weight_g":  # weight norm's gain, new and old naming
                    p.fill_(1.0)


def train_codec(cfg: CodecTrainConfig, log=print) -> EncodecModel:
    torch.manual_seed(cfg.seed)
    model = EncodecModel(codec_config(cfg))
    init_codec(model)
    clips = training_audio(cfg.songs, cfg.song_seconds, cfg.seed)
    model.train()
    train_autoencoder(model, clips, cfg, log)
    model.eval()
    fit_codebooks(model, clips, cfg, log)
    model.train()
    finetune_decoder(model, clips, cfg, log)
    model.eval()
    calibrate_level(model, clips[:60], log)
    return model


@torch.no_grad()
def calibrate_level(model: EncodecModel, clips, log=print):
    """Scale the decoder's last (linear) conv so that decoded audio is as loud as its input: without an
    adversarial loss the reconstruction comes out quieter (phase is free, and L1 favours small output)."""
    ratios = [np.sqrt(np.mean(roundtrip(model, c) ** 2) / max(np.mean(c ** 2), 1e-12)) for c in clips if np.abs(c).max() > 0.01]
    gain = 1.0 / float(np.median(ratios))
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    for name, p in last.named_parameters():
        if name.endswith("original0") or name in ("weight_g", "bias"):
            p.mul_(gain)
    log(f"codec level calibrated: decoded audio was {1 / gain:.2f}x its input's RMS")


@torch.no_grad()
def roundtrip(model: EncodecModel, audio: np.ndarray) -> np.ndarray:
    """Encode (quantised, 4 levels) and decode one mono clip."""
    x = torch.from_numpy(np.asarray(audio, dtype=np.float32))[None, None]
    codes = model.encode(x, bandwidth=max(model.config.target_bandwidths)).audio_codes
    return model.decode(codes, [None]).audio_values[0, 0, :len(audio)].numpy()


# ---- how well a codec keeps the toy's sounds ----------------------------------------------------
CHECK_SEED = 999  # the held-out songs a codec is measured on: no codec or LM trains on this seed


def crest_db(audio: np.ndarray) -> float:
    """Peak over RMS in dB: 14 dB for the synthetic drums, far more for a train of clicks inside each hit."""
    return float(20 * np.log10(np.abs(audio).max() / max(np.sqrt(np.mean(audio ** 2)), 1e-12)))


def onset_f1(reference: np.ndarray, decoded: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """mir_eval's onset F-measure (50 ms window) of librosa's onsets in the decoded audio against the original's."""
    import librosa
    import mir_eval

    ref = librosa.onset.onset_detect(y=reference, sr=sample_rate, units="time")
    est = librosa.onset.onset_detect(y=decoded, sr=sample_rate, units="time")
    return float(mir_eval.onset.f_measure(ref, est, window=0.05)[0]) if len(ref) else float("nan")


@torch.no_grad()
def codec_report(model: EncodecModel, n_songs: int = 16, seconds: float = 6.0, seed: int = CHECK_SEED,
                 style: synth.Style = synth.TOY_GM) -> dict:
    """Encode-decode held-out songs' stems and mixes; per kind: onset F1, crest factor (original and
    decoded, dB), decoded peak, and a multi-resolution STFT distance (auraloss's default resolutions)."""
    import auraloss

    stft = auraloss.freq.MultiResolutionSTFTLoss()
    songs = synth.make_songs(np.random.default_rng(seed), n_songs, seconds, SAMPLE_RATE, style)
    report = {}
    for kind in ("drums", "bass", "chords", "bass+chords", "mix"):
        rows = []
        for song in songs:
            audio = sum(song[p] for p in ("drums", "bass", "chords") if kind == "mix" or p in kind.split("+"))
            audio = np.clip(audio, -1, 1).astype(np.float32)
            decoded = roundtrip(model, audio)
            rows.append((onset_f1(audio, decoded), crest_db(audio), crest_db(decoded), np.abs(decoded).max(),
                         float(stft(torch.from_numpy(decoded)[None, None], torch.from_numpy(audio)[None, None]))))
        f1, crest, crest_decoded, peak, dist = (float(np.nanmean(c)) for c in zip(*rows))
        report[kind] = {"onset_f1": f1, "crest_db": crest, "crest_db_decoded": crest_decoded,
                        "peak_decoded": peak, "mrstft": dist}
    return report
