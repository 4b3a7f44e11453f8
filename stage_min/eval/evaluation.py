"""Does a generated stem play along with its context? STAGE's measures, offline.

- Beat alignment: a beat tracker on the generated stem, mir_eval's beat F-measure (70 ms window)
  against the reference beats (the click track's, or the song's).
- FAD and KAD between generated and reference stems, on the model's own codec latents.
- Pitch agreement (pitched targets, e.g. bass): how often the stem's dominant pitch class is the
  root of the chord that plays with it (chroma; the chord by triad templates).

No beat is trimmed: `mir_eval.beat.evaluate` drops the beats before 5 s, a convention for whole
songs that would drop most beats of a 4-10 s clip. We call `mir_eval.beat.f_measure` directly on
all beats of both sides (min_beat_time = 0), for the reference and the tracked beats alike.

Generation is seeded per call: several rows share a call (a batch), so a row's audio depends on the
seed and on the other rows of its batch. The same options give the same results.
"""
import csv
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..io.loading import LoadError, follow_latest, read_config, read_small
from ..train.beats import TRACK_HOP, TRACK_RATE, TRACKERS, beat_times

BEAT_WINDOW = 0.07  # seconds either side: the paper's (and mir_eval's default) F-measure window
MAX_FRAMES = 1500  # context, separator and stem share MusicGen's 30 s of positions
MAX_SECONDS = 600.0  # a model that generates in windows makes any length; ten minutes bound time and memory
SAMPLE_RATE = 32000  # EnCodec 32 kHz: the rate song windows are read at before a model is loaded
KAD_SCALE = 100  # kadtk reports MMD x 100; so do we, so that numbers read alike


class EvalError(Exception):
    """The evaluation cannot run as asked; the message says why."""


# ---- beats --------------------------------------------------------------------------------------
def track_beats(audio: np.ndarray, sample_rate: int, tracker: str = "librosa") -> np.ndarray:
    """Beat times (s) of mono audio, by stage_min.train.beats (the tracker training data uses too):
    librosa (untrimmed, over the audio and a silent tail) or Beat This!, if installed
    (`pip install beat-this`; it downloads its weights on first use)."""
    if tracker not in TRACKERS:
        raise EvalError(f"unknown beat tracker {tracker!r}; choose one of {', '.join(TRACKERS)}")
    try:
        return beat_times(audio, sample_rate, tracker)
    except ValueError as e:  # beat_this not installed, or its weights not loadable
        raise EvalError(str(e)) from None


def f_measure(reference_beats, estimated_beats) -> float:
    """mir_eval's beat F-measure, 70 ms window, no trimming. NaN when there is no reference beat."""
    import mir_eval

    reference_beats = np.asarray(reference_beats, dtype=np.float64)
    if len(reference_beats) == 0:
        return float("nan")
    with warnings.catch_warnings():  # mir_eval warns on an empty estimate; its score 0 is right
        warnings.simplefilter("ignore")
        return float(mir_eval.beat.f_measure(reference_beats, np.asarray(estimated_beats, dtype=np.float64), BEAT_WINDOW))


def tempo_of(beats) -> float:
    """Tempo (BPM) of tracked beats: 60 / the median inter-beat interval. NaN with fewer than 2."""
    beats = np.asarray(beats, dtype=np.float64)
    return float(60.0 / np.median(np.diff(beats))) if len(beats) >= 2 else float("nan")


def beat_scores(audio: np.ndarray, sample_rate: int, reference_beats, tracker: str = "librosa") -> dict:
    """Track the beats of `audio` and score them against `reference_beats` (seconds)."""
    beats = track_beats(audio, sample_rate, tracker)
    return {"f_measure": f_measure(reference_beats, beats), "tempo_bpm": tempo_of(beats), "n_beats": len(beats),
            "n_reference_beats": len(reference_beats), "beats": beats}


# ---- distributions: FAD and KAD ------------------------------------------------------------------
def _rows(emb, name) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or len(emb) < 2:
        raise EvalError(f"{name}: need a (rows, dims) array with at least 2 rows, got shape {emb.shape}")
    return emb


def fad(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two embedding sets (rows = frames):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2), the square root by scipy.linalg.sqrtm."""
    from scipy import linalg

    a, b = _rows(emb_a, "fad"), _rows(emb_b, "fad")
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # a (near) singular product: nudge both covariances
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    diff = a.mean(0) - b.mean(0)
    return float(max(0.0, diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root).real))


def kad(emb_a: np.ndarray, emb_b: np.ndarray, bandwidth: float | None = None) -> float:
    """Kernel audio distance (Chung et al. 2025): the unbiased MMD^2 estimate with a Gaussian
    kernel, bandwidth the median pairwise distance within `emb_b` (the reference set), x 100.
    Unbiased for independent sets; a set against itself gives a small negative -(200/n)(1 - mean
    kernel), since the cross term then pairs each point with itself."""
    from scipy.spatial.distance import cdist, pdist

    a, b = _rows(emb_a, "kad"), _rows(emb_b, "kad")
    h = float(np.median(pdist(b))) if bandwidth is None else bandwidth
    gamma = 1.0 / (2 * h * h + 1e-12)

    def mean_kernel(x, y, same):
        k = np.exp(-gamma * cdist(x, y, "sqeuclidean"))
        if same:  # unbiased: a point is not compared with itself
            return (k.sum() - np.trace(k)) / (len(x) * (len(x) - 1))
        return k.mean()

    return float(KAD_SCALE * (mean_kernel(a, a, True) + mean_kernel(b, b, True) - 2 * mean_kernel(a, b, False)))


@torch.no_grad()
def codec_embeddings(model, audios) -> np.ndarray:
    """The model's own EnCodec latents before quantisation, one row per codec frame, all audios
    stacked: (frames, latent dims). Reported as fad_encodec / kad_encodec (not VGGish, not CLAP)."""
    encoder = model.codec.model.encoder
    p = next(encoder.parameters())
    rows = [encoder(torch.as_tensor(np.asarray(a), dtype=p.dtype, device=p.device)[None, None])[0].T for a in audios]
    return torch.cat(rows).double().cpu().numpy()


# ---- pitch: does the stem play the chord's root? --------------------------------------------------
PITCH_RATE = 22050  # chroma at the tracker's rate: CQT bins up to C8 stay under its Nyquist
PITCH_HOP = 512  # 23 ms chroma frames
STEM_FMIN = 32.70  # C1: a bass's lowest notes (E1, 41 Hz) still get bins of their own
HARMONY_FMIN = 130.81  # C3: a chord is read from the notes above the kick and the bass, which pull
# a context's chroma onto their own pitch (docs/evaluation.md: toy songs' real bass 0.99, 0.66 read from C1 with the hits)
HARMONY_MARGIN = 2.0  # librosa.effects.harmonic's margin: the drums' hits are taken out of the harmony first
AUDIBLE_DB = -30.0  # a frame is audible within 30 dB of its signal's loudest frame...
AUDIBLE_FLOOR = 1e-3  # ...and above -60 dBFS RMS
CHORD_SMOOTH = 9  # frames (~0.2 s) of chroma averaged before a chord is matched: one note of an arpeggio is no chord
UNPITCHED = ("drums", "percussion")  # targets without a pitch to compare; every other target is scored


def _chroma(audio: np.ndarray, sample_rate: int, fmin: float, harmonic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(chroma (12, frames): CQT energy from fmin up to C8 folded onto C..B, not normalised;
    RMS per frame (frames,)). harmonic: of the harmonic part only (HPSS), the hits taken out."""
    import librosa
    import soxr

    y = np.asarray(audio, dtype=np.float32)
    if sample_rate != PITCH_RATE:
        y = soxr.resample(y, sample_rate, PITCH_RATE).astype(np.float32)
    rms = librosa.feature.rms(y=y, frame_length=2048, hop_length=PITCH_HOP)[0]
    if harmonic:
        y = librosa.effects.harmonic(y, margin=HARMONY_MARGIN)
    with warnings.catch_warnings():  # silence has no tuning to estimate; its frames are left out anyway
        warnings.simplefilter("ignore")
        chroma = librosa.feature.chroma_cqt(y=y, sr=PITCH_RATE, hop_length=PITCH_HOP, fmin=fmin,
                                            n_octaves=round(np.log2(4186.0 / fmin)), bins_per_octave=36, norm=None)
    n = min(chroma.shape[1], len(rms))
    return chroma[:, :n], rms[:n]


def _audible(rms: np.ndarray) -> np.ndarray:
    top = float(rms.max()) if len(rms) else 0.0
    return rms >= max(AUDIBLE_FLOOR, top * 10 ** (AUDIBLE_DB / 20))


def _triads() -> np.ndarray:
    """The 24 major and minor triads as unit chroma vectors: rows 0-11 major on C..B, 12-23 minor."""
    rows = []
    for third in (4, 3):
        for root in range(12):
            v = np.zeros(12)
            v[[root, (root + third) % 12, (root + 7) % 12]] = 1
            rows.append(v / np.linalg.norm(v))
    return np.array(rows)


def chord_roots(harmony: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per chroma frame (times: i * PITCH_HOP / PITCH_RATE s) the root pitch class (0 = C) of the
    major or minor triad whose template best matches the harmony's chroma (its harmonic part, from
    C3 up, smoothed over CHORD_SMOOTH frames); -1 where the harmony is silent."""
    from scipy.ndimage import uniform_filter1d

    chroma, rms = _chroma(harmony, sample_rate, HARMONY_FMIN, harmonic=True)
    chroma = uniform_filter1d(chroma, CHORD_SMOOTH, axis=1, mode="nearest")
    chroma = chroma / (np.linalg.norm(chroma, axis=0, keepdims=True) + 1e-12)
    roots = (_triads() @ chroma).argmax(0) % 12
    return np.where(_audible(rms), roots, -1)


def pitch_agreement(stem: np.ndarray, harmony: np.ndarray, sample_rate: int) -> float:
    """Of the frames where the stem and the harmony are both audible, the fraction in which the
    stem's dominant pitch class (its chroma's largest bin, from C1 up) is the root of the chord the
    harmony plays (chord_roots). A bass on the chord roots scores near 1, one in another key near 0,
    noise about 1/12. NaN when no frame has both."""
    return _agreement(stem, chord_roots(harmony, sample_rate), sample_rate)


def _agreement(stem: np.ndarray, roots: np.ndarray, sample_rate: int) -> float:
    chroma, rms = _chroma(stem, sample_rate, STEM_FMIN)
    n = min(len(rms), len(roots))
    both = _audible(rms)[:n] & (roots[:n] >= 0)
    if not both.any():
        return float("nan")
    return float(np.mean(chroma[:, :n].argmax(0)[both] == roots[:n][both]))


def is_pitched(target: str) -> bool:
    """Whether pitch_agreement scores this target: every stem but drums and percussion."""
    return target not in UNPITCHED


def _pitch_fields(harmony, sample_rate: int, stems: dict) -> dict:
    """Row fields "pitch_agreement" + suffix, for `stems`: suffix ("", "_nocontext", ...) -> audio.
    The harmony's chords are estimated once for all of them."""
    roots = chord_roots(harmony, sample_rate)
    return {f"pitch_agreement{suffix}": _agreement(audio, roots, sample_rate) for suffix, audio in stems.items()}


# ---- generation ---------------------------------------------------------------------------------
def _generate(model, contexts, prompts, n_frames, sampling, seed, batch_size, bar) -> tuple[list, list]:
    """Stems with the contexts and, for the baseline, the same rows with the context dropped
    (text only), `batch_size` rows per call. Returns two lists of mono float32 arrays."""
    with_context, without = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = slice(i, i + batch_size)
        ctx = [torch.as_tensor(c, dtype=torch.float32) for c in contexts[chunk]]
        audio, _ = model.accompany(ctx, prompts[chunk], n_frames, sampling, seed=seed)
        with_context += list(audio[:, 0].cpu().numpy())
        bar.update(len(ctx))
        audio, _ = model.generate(prompts[chunk], n_frames, sampling, seed=seed)
        without += list(audio[:, 0].cpu().numpy())
        bar.update(len(ctx))
    return with_context, without


def check_seconds(seconds: float, model=None):
    """--seconds: > 0 and at most MAX_SECONDS (cheap: before a model loads). With `model`, also what it
    can make: context, separator and stem share MAX_FRAMES positions, unless the model generates
    in windows (window_frames, the toy): then a stem of any length is made window by window."""
    if not (seconds > 0 and np.isfinite(seconds)):
        raise EvalError(f"--seconds must be > 0, got {seconds:g}")
    if seconds > MAX_SECONDS:
        raise EvalError(f"--seconds at most {MAX_SECONDS:g}, got {seconds:g}")
    if model is None or getattr(model, "window_frames", None):
        return
    rate = model.codec.frame_rate
    if 2 * round(seconds * rate) + 1 > MAX_FRAMES:
        raise EvalError(f"--seconds at most {(MAX_FRAMES - 1) // 2 / rate:g} for this model (context and stem share "
                        f"{MAX_FRAMES / rate:g} s; only a model that generates in windows makes longer stems), got {seconds:g}")


def _round(beats) -> list:
    return [round(float(t), 3) for t in beats]


def _scored(prefix: str, scores: dict) -> dict:
    """beat_scores -> row fields, `prefix` after each name (f_measure_nocontext, ...)."""
    return {f"f_measure{prefix}": scores["f_measure"], f"tempo_bpm{prefix}": scores["tempo_bpm"],
            f"n_beats{prefix}": scores["n_beats"], f"beats{prefix}": _round(scores["beats"])}


def _mean(rows, key) -> float:
    values = [r[key] for r in rows if r[key] is not None and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


# ---- the tempo experiment -----------------------------------------------------------------------
def tempo_experiment(model, bpms, seeds, seconds: float, prompt: str, out_dir, sampling=None, tracker: str = "librosa",
                     batch_size: int = 8, progress: bool = True, meters=(4,)) -> dict:
    """The paper's tempo experiment: for each BPM, meter (beats per bar: which clicks are downbeats)
    and seed, a stem generated from a click track (model.accompany) and, as the baseline, from the
    prompt alone (model.generate), both scored against the click's beats. `seeds`: a count (0..N-1)
    or a list. Writes the audio under out_dir/audio; returns the results (rows, means, means per
    BPM and meter, and per meter)."""
    from ..io.metronome import metronome

    check_seconds(seconds, model)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    meters = list(meters)
    sr, n_frames = model.sample_rate, round(seconds * model.codec.frame_rate)
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    grid = [(bpm, meter) for bpm in bpms for meter in meters]  # with one meter: the old rows, in the old order
    clicks = [metronome(bpm, seconds, beats_per_bar=meter, sample_rate=sr) for bpm, meter in grid]
    rows = []
    bar = tqdm(total=2 * len(grid) * len(seeds), desc="tempo: stems generated", unit="stem", disable=not progress)
    for seed in seeds:
        stems, baseline = _generate(model, clicks, [prompt] * len(grid), n_frames, sampling, seed, batch_size, bar)
        for (bpm, meter), click, stem, plain in zip(grid, clicks, stems, baseline):
            name = f"bpm{bpm:g}_m{meter}_seed{seed}" if len(meters) > 1 else f"bpm{bpm:g}_seed{seed}"
            rows.append(_tempo_row(bpm, meter, seed, name, click, stem, plain, sr, audio_dir, tracker))
    bar.close()
    per_bpm = [{"bpm": bpm, "meter": meter, **_f_means([r for r in rows if r["bpm"] == bpm and r["meter"] == meter])}
               for bpm, meter in grid]
    per_meter = [{"meter": meter, **_f_means([r for r in rows if r["meter"] == meter])} for meter in meters]
    return {"experiment": "tempo", "prompt": prompt, "seconds": seconds, "bpms": list(bpms), "meters": meters,
            "seeds": seeds, "tracker": tracker, "beat_window_s": BEAT_WINDOW, "rows": rows, "per_bpm": per_bpm,
            "per_meter": per_meter, "mean": _mean(rows, "f_measure"), "mean_nocontext": _mean(rows, "f_measure_nocontext")}


def _tempo_row(bpm, meter, seed, name, click, stem, plain, sr, audio_dir, tracker) -> dict:
    """Write one tempo row's audio (stem, stem + clicks, baseline) and score it against the clicks."""
    from ..io.audio import save_audio
    from ..io.metronome import beat_times

    save_audio(audio_dir / f"{name}.wav", stem, sr)
    save_audio(audio_dir / f"{name}_mix.wav", stem + click[: len(stem)], sr)
    save_audio(audio_dir / f"{name}_nocontext.wav", plain, sr)
    reference = beat_times(bpm, len(stem) / sr)
    return {"bpm": bpm, "meter": meter, "seed": seed, **_scored("", beat_scores(stem, sr, reference, tracker)),
            **_scored("_nocontext", beat_scores(plain, sr, reference, tracker)),
            "reference_beats": _round(reference), "audio": f"audio/{name}.wav", "audio_nocontext": f"audio/{name}_nocontext.wav"}


def _f_means(rows) -> dict:
    return {"f_measure": _mean(rows, "f_measure"), "f_measure_nocontext": _mean(rows, "f_measure_nocontext")}


# ---- the accompaniment experiment -----------------------------------------------------------------
@dataclass
class SongWindow:
    """`seconds` of one song: the context (other stems' mix), the reference target stem, the song's
    beats in that span (times from the window's start) and its harmony (what pitch_agreement
    compares a stem with: the song's chords stem when it plays there, else the context)."""
    song: str
    start: float
    context: np.ndarray
    reference: np.ndarray
    beats: np.ndarray
    prompt: str
    context_stems: list = field(default_factory=list)
    harmony: np.ndarray | None = None


SPLITS = ("held-out", "all")  # --split: train.py's held-out songs of --data, or every song (a sealed set)


def held_out_songs(data_dir, target: str, val_fraction: float, split_seed: int) -> list:
    """The songs train.py holds out (same split function, fraction and seed) that have `target`."""
    from ..train import data as D

    songs = D.find_songs(data_dir)
    _, held = D.split_songs(songs, val_fraction, split_seed)
    if not held:
        print(f"warning: {data_dir} has {len(songs)} song(s): no held-out split; evaluating on all of them", file=sys.stderr)
        held = songs
    held = [s for s in held if target in s.stems]
    if not held:
        raise EvalError(f"no held-out song in {data_dir} has a '{target}' stem")
    return held


def eval_songs(data_dir, target: str, split: str = "held-out", val_fraction: float = 0.1, split_seed: int = 0) -> list:
    """The songs an experiment scores, those with `target`: train.py's held-out split of `data_dir`
    (held_out_songs), or with split "all" every song of it (a sealed set's own folder, which no run
    trained on: there is nothing to hold out)."""
    from ..train import data as D

    if split not in SPLITS:
        raise EvalError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "held-out":
        return held_out_songs(data_dir, target, val_fraction, split_seed)
    songs = [s for s in D.find_songs(data_dir) if target in s.stems]
    if not songs:
        raise EvalError(f"no song in {data_dir} has a '{target}' stem")
    return songs


def _song_beats(song, stems: dict, sample_rate: int, tracker: str) -> np.ndarray:
    """beats.txt when the song has one, else tracked on the full mix (all stems, vocals too)."""
    from ..train import data as D

    if song.beats_file is not None:
        try:
            return D.parse_beats(read_small(song.beats_file, 16 << 20).decode("utf-8"))[0]
        except (LoadError, UnicodeDecodeError, ValueError) as e:
            print(f"warning: {song.beats_file}: {e}; tracking the beats instead", file=sys.stderr)
    mix = np.zeros(max(len(a) for a in stems.values()), dtype=np.float32)
    for a in stems.values():
        mix[: len(a)] += a
    return track_beats(mix, sample_rate, tracker)


def song_window(song, target: str, seconds: float, sample_rate: int = SAMPLE_RATE, tracker: str = "librosa") -> SongWindow | None:
    """The first window (on a grid of half windows) where the target and at least one context stem
    are audible (peak >= the training data's silence level). Context = every audible stem but the
    target and the stems training leaves out of contexts (vocals, percussion, wind, other_plucked). None (with a warning) when the song has no such
    window or cannot be read."""
    from ..train import data as D
    from ..io.audio import AudioError

    silence = D.DataConfig().silence
    # the original's context stems; a stem of another naming (synthetic songs' chords) counts as one
    may_be_context = [s for s in song.stems if s != target and (s in D.STAGE_CONTEXT_STEMS or s not in D.MOISESDB_STEMS)]
    try:
        stems = {s: D.load_stem(files, sample_rate) for s, files in sorted(song.stems.items())}
    except AudioError as e:
        print(f"warning: skipping {song.name}: {e}", file=sys.stderr)
        return None
    n = int(round(seconds * sample_rate))
    length = max(len(a) for a in stems.values())
    stems = {s: np.pad(a, (0, length - len(a))) for s, a in stems.items()}
    for start in range(0, length - n + 1, max(1, n // 2)):
        span = slice(start, start + n)
        others = [s for s in stems if s in may_be_context and np.abs(stems[s][span]).max() >= silence]
        if others and np.abs(stems[target][span]).max() >= silence:
            break
    else:
        why = (f"shorter than {seconds:g} s" if length < n else
               f"no {seconds:g} s window where '{target}' and another stem both play")
        print(f"warning: skipping {song.name}: {why}", file=sys.stderr)
        return None
    t0 = start / sample_rate
    beats = _song_beats(song, stems, sample_rate, tracker)
    inside = beats[(beats >= t0) & (beats < t0 + seconds)] - t0
    context = sum(stems[s][span] for s in others).astype(np.float32)
    harmony = stems["chords"][span].astype(np.float32) if "chords" in others else context
    return SongWindow(song.name, t0, context, stems[target][span].astype(np.float32), inside, song.caption, others, harmony)


def accompany_windows(data_dir, target: str, n_songs: int | None, seconds: float, val_fraction: float = 0.1,
                      split_seed: int = 0, tracker: str = "librosa", sample_rate: int = SAMPLE_RATE,
                      split: str = "held-out") -> list[SongWindow]:
    """Up to `n_songs` usable song windows (all when None) of the `split` (see eval_songs)."""
    check_seconds(seconds)
    windows = []
    for song in eval_songs(data_dir, target, split, val_fraction, split_seed):
        if n_songs is not None and len(windows) >= n_songs:
            break
        w = song_window(song, target, seconds, sample_rate, tracker)
        if w is not None:
            windows.append(w)
    if not windows:
        which = "held-out song" if split == "held-out" else "song"
        raise EvalError(f"no usable {which} in {data_dir}: none has {seconds:g} s where '{target}' and a context stem play")
    return windows


def train_split(model_spec: str) -> tuple[float, int]:
    """(val_fraction, seed) of the run that trained `model_spec` (a run folder's config.json), else
    train.py's defaults: with split_songs, the songs that run held out."""
    from ..train.data import DataConfig
    from ..train.training import TrainConfig

    try:  # a run folder: its latest step's config.json
        train = read_config(follow_latest(Path(model_spec))).get("train") or {}
        val_fraction = float((train.get("data_cfg") or {}).get("val_fraction", DataConfig().val_fraction))
        seed = int(train.get("seed", TrainConfig().seed))
    except (LoadError, OSError, ValueError, TypeError, AttributeError, OverflowError):
        return DataConfig().val_fraction, TrainConfig().seed
    return val_fraction, seed


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def accompany_experiment(model, data_dir, target: str, out_dir, n_songs: int | None = None, seconds: float = 10.0,
                         prompt: str | None = None, sampling=None, seed: int = 0, tracker: str = "librosa",
                         batch_size: int = 8, val_fraction: float = 0.1, split_seed: int = 0, progress: bool = True,
                         split: str = "held-out") -> dict:
    """STAGE on songs: the target stem generated with the other stems as context and, as the
    baseline, from the prompt alone; each scored against the song's beats (the reference stem too,
    as a ceiling), and FAD/KAD (codec latents) of each set of generated stems against the reference
    stems; a pitched target also by pitch_agreement with the song's harmony. prompt None: each
    song's caption.txt (else ""). split "held-out": the songs of split_songs(val_fraction,
    split_seed) (see train_split); "all": every song of data_dir (a sealed set). A model that
    generates in windows makes stems of any --seconds, each over its whole span of the song.
    Writes the audio under out_dir/audio; returns the results."""
    check_seconds(seconds, model)
    sr = model.sample_rate
    windows = accompany_windows(data_dir, target, n_songs, seconds, val_fraction, split_seed, tracker, sr, split)
    n_frames = round(seconds * model.codec.frame_rate)
    prompts = [w.prompt if prompt is None else prompt for w in windows]
    bar = tqdm(total=2 * len(windows), desc="accompany: stems generated", unit="stem", disable=not progress)
    # each context is the window's whole span: the pipeline cuts nothing a window model makes in windows
    stems, baseline = _generate(model, [w.context for w in windows], prompts, n_frames, sampling, seed, batch_size, bar)
    bar.close()
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = [_accompany_row(w, stem, plain, text, sr, audio_dir, tracker, is_pitched(target))
            for w, stem, plain, text in zip(windows, stems, baseline, prompts)]
    ref_emb = codec_embeddings(model, [w.reference[: n_frames * model.codec.hop] for w in windows])
    gen_emb, plain_emb = codec_embeddings(model, stems), codec_embeddings(model, baseline)
    return {"experiment": "accompany", "target": target, "split": split, "seconds": seconds, "seed": seed,
            "tracker": tracker, "beat_window_s": BEAT_WINDOW, "n_songs": len(rows), "rows": rows,
            "mean": _mean(rows, "f_measure"), "mean_nocontext": _mean(rows, "f_measure_nocontext"),
            "mean_reference": _mean(rows, "f_measure_reference"), **_pitch_means(rows),
            "fad_encodec": fad(gen_emb, ref_emb), "kad_encodec": kad(gen_emb, ref_emb),
            "fad_encodec_nocontext": fad(plain_emb, ref_emb), "kad_encodec_nocontext": kad(plain_emb, ref_emb),
            "embedding": "the model's EnCodec encoder latents before quantisation, one row per frame"}


def _accompany_row(w: SongWindow, stem, plain, prompt, sr, audio_dir, tracker, pitched: bool) -> dict:
    """Write one song's audio (generated, baseline, reference, context, mix) and score it."""
    from ..io.audio import save_audio

    name = _safe(w.song)
    reference = w.reference[: len(stem)]
    for suffix, audio in (("generated", stem), ("nocontext", plain), ("reference", reference),
                          ("context", w.context), ("mix", stem + w.context[: len(stem)])):
        save_audio(audio_dir / f"{name}_{suffix}.wav", audio, sr)
    pitch = _pitch_fields(w.harmony[: len(stem)], sr, {"": stem, "_nocontext": plain, "_reference": reference}) if pitched else {}
    return {"song": w.song, "start_s": round(w.start, 3), "prompt": prompt, "context_stems": w.context_stems,
            **_scored("", beat_scores(stem, sr, w.beats, tracker)),
            **_scored("_nocontext", beat_scores(plain, sr, w.beats, tracker)),
            **_scored("_reference", beat_scores(reference, sr, w.beats, tracker)), **pitch,
            "reference_beats": _round(w.beats), "audio": f"audio/{name}_generated.wav",
            "audio_nocontext": f"audio/{name}_nocontext.wav"}


def _pitch_means(rows) -> dict:
    """mean_pitch_agreement{,_nocontext,_reference} over the rows that have them (pitched targets)."""
    keys = [k for k in ("pitch_agreement", "pitch_agreement_nocontext", "pitch_agreement_reference") if rows and k in rows[0]]
    return {f"mean_{k}": _mean(rows, k) for k in keys}


# ---- a probe on real music: any recordings as contexts ------------------------------------------------
PROBE_EXTS = (".wav", ".flac", ".mp3")  # what a folder given to the probe is searched for
MIN_PROBE_SECONDS = 1.0  # a beat tracker needs a few beats; shorter files are refused
MAX_PROMPT_BYTES = 64 << 10  # a prompt file is a line or a paragraph


def probe_files(path) -> list[Path]:
    """The audio files of the probe: `path` itself, or the .wav/.flac/.mp3 files of a folder, sorted.
    Each is checked from its header (readable, at least MIN_PROBE_SECONDS long) before a model loads."""
    from ..io.audio import audio_seconds

    path = Path(path)
    if not path.exists():
        raise EvalError(f"--audio {path}: no such file or folder")
    files = [path]
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in PROBE_EXTS and not f.name.startswith(".") and f.is_file())
        if not files:
            raise EvalError(f"--audio {path}: the folder holds no {', '.join(PROBE_EXTS)} file")
    for f in files:
        if audio_seconds(f) < MIN_PROBE_SECONDS:  # AudioError (one line) when it cannot be read
            raise EvalError(f"{f}: shorter than {MIN_PROBE_SECONDS:g} s, too short to track beats in")
    return files


def probe_prompt(audio_file: Path, default: str = "") -> str:
    """The text beside an audio file, NAME-desc.txt or NAME.txt (NAME: the file's name without its
    suffix), else `default`."""
    for side in (audio_file.with_name(f"{audio_file.stem}-desc.txt"), audio_file.with_name(f"{audio_file.stem}.txt")):
        if side.is_file():
            try:
                return read_small(side, MAX_PROMPT_BYTES).decode("utf-8").strip()
            except UnicodeDecodeError:
                raise EvalError(f"{side}: not UTF-8 text") from None
    return default


def context_experiment(model, files, target: str, out_dir, seconds: float = 10.0, prompt: str = "", sampling=None,
                       seed: int = 0, tracker: str = "librosa", batch_size: int = 8, progress: bool = True) -> dict:
    """A probe on real music: each file (mono, at the model's rate, its first `seconds`, whole codec
    frames) is the context of a generated `target` stem and, as the baseline, of none (prompt alone);
    both are scored against the beats tracked on the file itself, and a pitched target by
    pitch_agreement with the file. Prompt: probe_prompt(file, prompt). Writes the audio under
    out_dir/audio; returns the results."""
    from ..io.audio import load_audio

    check_seconds(seconds, model)
    sr, hop = model.sample_rate, model.codec.hop
    n_max = round(seconds * model.codec.frame_rate)
    contexts = []
    for f in files:
        audio = load_audio(f, sr, max_seconds=seconds)
        contexts.append(audio[: min(n_max, len(audio) // hop) * hop])  # a shorter file: its own length
    prompts = [probe_prompt(Path(f), prompt) for f in files]
    bar = tqdm(total=2 * len(files), desc="context: stems generated", unit="stem", disable=not progress)
    stems, baseline = _generate_by_length(model, contexts, prompts, sampling, seed, batch_size, bar)
    bar.close()
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = [_probe_row(Path(f), name, c, stem, plain, text, sr, audio_dir, tracker, is_pitched(target))
            for f, name, c, stem, plain, text in zip(files, _unique_names(files), contexts, stems, baseline, prompts)]
    return {"experiment": "context", "target": target, "seconds": seconds, "seed": seed, "tracker": tracker,
            "beat_window_s": BEAT_WINDOW, "n_files": len(rows), "rows": rows, "mean": _mean(rows, "f_measure"),
            "mean_nocontext": _mean(rows, "f_measure_nocontext"), **_pitch_means(rows)}


def _generate_by_length(model, contexts, prompts, sampling, seed, batch_size, bar) -> tuple[list, list]:
    """_generate for contexts of whole frames but of different lengths: one group per length."""
    stems, baseline = [None] * len(contexts), [None] * len(contexts)
    for n in sorted({len(c) for c in contexts}):
        rows = [i for i, c in enumerate(contexts) if len(c) == n]
        made = _generate(model, [contexts[i] for i in rows], [prompts[i] for i in rows], n // model.codec.hop,
                         sampling, seed, batch_size, bar)
        for i, stem, plain in zip(rows, *made):
            stems[i], baseline[i] = stem, plain
    return stems, baseline


def _unique_names(files) -> list[str]:
    """Audio names from the files' names without suffix; with the suffix where two would clash (a.wav, a.mp3)."""
    stems = [_safe(Path(f).stem) for f in files]
    return [s if stems.count(s) == 1 else _safe(Path(f).name.replace(".", "_")) for s, f in zip(stems, files)]


def _probe_row(path: Path, name, context, stem, plain, prompt, sr, audio_dir, tracker, pitched: bool) -> dict:
    """Write one file's audio (generated, baseline, context, mix) and score it against the file's own beats."""
    from ..io.audio import save_audio

    for suffix, audio in (("generated", stem), ("nocontext", plain), ("context", context), ("mix", stem + context)):
        save_audio(audio_dir / f"{name}_{suffix}.wav", audio, sr)
    beats = track_beats(context, sr, tracker)
    pitch = _pitch_fields(context, sr, {"": stem, "_nocontext": plain}) if pitched else {}
    return {"song": path.name, "file": str(path), "seconds": round(len(context) / sr, 3), "prompt": prompt,
            **_scored("", beat_scores(stem, sr, beats, tracker)), **_scored("_nocontext", beat_scores(plain, sr, beats, tracker)),
            **pitch, "reference_beats": _round(beats), "audio": f"audio/{name}_generated.wav",
            "audio_nocontext": f"audio/{name}_nocontext.wav"}


# ---- writing the results ------------------------------------------------------------------------
def jsonable(x):
    """NaN/inf -> None (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_results(results: dict, out_dir) -> list[Path]:
    """results.json (everything) and results.csv (the rows' scalar fields), each written atomically."""
    from ..io.loading import write_atomic

    out_dir = Path(out_dir)
    results = jsonable(results)
    write_atomic(out_dir / "results.json", lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    # the CSV: scalar fields, lists of names joined with "+" (context_stems), beat lists left to the JSON
    rows = [{k: "+".join(v) if isinstance(v, list) and v and all(isinstance(i, str) for i in v) else v
             for k, v in r.items()} for r in results["rows"]]
    columns = [k for k, v in rows[0].items() if not isinstance(v, list)]

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    write_atomic(out_dir / "results.csv", write_csv)
    return [out_dir / "results.json", out_dir / "results.csv"]


def write_report(results: dict, out_dir) -> Path:
    """report.png: beat F-measure per BPM and meter (or per song, or per file) with and without the
    context, and the first row's stem as a beat plot (onset envelope, reference beats, tracked beats)."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    from ..io.audio import load_audio
    from ..io.loading import write_atomic

    out_dir = Path(out_dir)
    results = jsonable(results)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5))
    _plot_scores(top, results)
    row = results["rows"][0]
    y = load_audio(out_dir / row["audio"], TRACK_RATE)
    envelope = librosa.onset.onset_strength(y=y, sr=TRACK_RATE, hop_length=TRACK_HOP)
    times = librosa.times_like(envelope, sr=TRACK_RATE, hop_length=TRACK_HOP)
    bottom.plot(times, envelope / (envelope.max() or 1), color="0.4", lw=0.8, label="onset strength (generated stem)")
    bottom.vlines(row["reference_beats"], 0, 1.05, color="tab:green", lw=2, alpha=0.6, label="reference beats")
    bottom.vlines(row["beats"], 0, 1.05, color="tab:red", lw=1, linestyles="--", label="tracked beats")
    label = f"{row['bpm']:g} BPM, {row.get('meter', 4)} beats a bar, seed {row['seed']}" if "bpm" in row else row["song"]
    f1 = "n/a" if row["f_measure"] is None else f"{row['f_measure']:.2f}"
    bottom.set(title=f"Example: {label} (F-measure {f1})", xlabel="time (s)", ylabel="normalised onset strength")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out_dir / "report.png"
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def _plot_scores(ax, results: dict):
    if results["experiment"] == "tempo":
        _plot_tempo(ax, results)
    else:
        rows = results["rows"]
        keys = [(k, label) for k, label in (("f_measure", "with the context"), ("f_measure_nocontext", "text only (no context)"),
                                            ("f_measure_reference", "reference stem")) if k in rows[0]]
        x, width = np.arange(len(rows)), 0.8 / len(keys)
        for i, (key, label) in enumerate(keys):
            ax.bar(x + (i - (len(keys) - 1) / 2) * width, [_nan(r[key]) for r in rows], width, label=label)
        ax.set_xticks(x, [r["song"][:14] for r in rows], rotation=30, fontsize=7)
        if results["experiment"] == "accompany":
            fads = [("n/a" if results[k] is None else f"{results[k]:.3g}") for k in ("fad_encodec", "fad_encodec_nocontext")]
            which = "held-out song" if results.get("split", "held-out") == "held-out" else "song"
            ax.set(title=f"Beat F-measure per {which} (FAD on codec latents: {fads[0]} with the context, {fads[1]} without)")
        else:
            ax.set(title="Beat F-measure per file, against the beats tracked on the file itself")
    ax.set(ylabel="F-measure (70 ms)", ylim=(0, 1.05))
    ax.legend(fontsize=8)


def _nan(v):
    return np.nan if v is None else v


def _plot_tempo(ax, results: dict):
    """Mean F-measure per BPM, a pair of lines (with / without the clicks) per meter, one colour per
    meter when there are several; dots: single stems."""
    meters = results.get("meters", [4])
    for i, meter in enumerate(meters):
        per = [r for r in results["per_bpm"] if r.get("meter", 4) == meter]
        rows = [r for r in results["rows"] if r.get("meter", 4) == meter]
        suffix = f", {meter} beats a bar" if len(meters) > 1 else ""
        for key, style, label in (("f_measure", "o-", "with the click track"), ("f_measure_nocontext", "s--", "text only (no context)")):
            line, = ax.plot([r["bpm"] for r in per], [_nan(r[key]) for r in per], style, label=label + suffix,
                            color=f"C{i}" if len(meters) > 1 else None)
            ax.scatter([r["bpm"] for r in rows], [_nan(r[key]) for r in rows], s=8, alpha=0.4, color=line.get_color())
    ax.set(xlabel="click track tempo (BPM)", title=f"Beat F-measure per tempo ({len(results['seeds'])} seed(s) each; dots: single stems)")
