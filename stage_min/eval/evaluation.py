"""Does a generated stem play along with its context? STAGE's measures, offline.

- Beat alignment: a beat tracker on the generated stem, mir_eval's beat F-measure (70 ms window)
  against the reference beats (the click track's, or the song's).
- FAD and KAD between generated and reference stems, on the model's own codec latents.

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


def check_seconds(seconds: float):
    if not (seconds > 0 and np.isfinite(seconds)):
        raise EvalError(f"--seconds must be > 0, got {seconds:g}")
    if 2 * round(seconds * 50) + 1 > MAX_FRAMES:
        raise EvalError(f"--seconds at most {(MAX_FRAMES - 1) // 2 / 50:g} (context and stem share {MAX_FRAMES / 50:g} s), got {seconds:g}")


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
                     batch_size: int = 8, progress: bool = True) -> dict:
    """The paper's tempo experiment: for each BPM and seed, a stem generated from a click track
    (model.accompany) and, as the baseline, from the prompt alone (model.generate), both scored
    against the click's beats. `seeds`: a count (0..N-1) or a list. Writes the audio under
    out_dir/audio; returns the results (rows, means, per-BPM means)."""
    from ..io.audio import save_audio
    from ..io.metronome import beat_times, metronome

    check_seconds(seconds)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    sr, n_frames = model.sample_rate, round(seconds * model.codec.frame_rate)
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    clicks = [metronome(bpm, seconds, sample_rate=sr) for bpm in bpms]
    rows = []
    bar = tqdm(total=2 * len(bpms) * len(seeds), desc="tempo: stems generated", unit="stem", disable=not progress)
    for seed in seeds:
        stems, baseline = _generate(model, clicks, [prompt] * len(bpms), n_frames, sampling, seed, batch_size, bar)
        for bpm, click, stem, plain in zip(bpms, clicks, stems, baseline):
            name = f"bpm{bpm:g}_seed{seed}"
            save_audio(audio_dir / f"{name}.wav", stem, sr)
            save_audio(audio_dir / f"{name}_mix.wav", stem + click[: len(stem)], sr)
            save_audio(audio_dir / f"{name}_nocontext.wav", plain, sr)
            reference = beat_times(bpm, len(stem) / sr)
            rows.append({"bpm": bpm, "seed": seed, **_scored("", beat_scores(stem, sr, reference, tracker)),
                         **_scored("_nocontext", beat_scores(plain, sr, reference, tracker)),
                         "reference_beats": _round(reference), "audio": f"audio/{name}.wav",
                         "audio_nocontext": f"audio/{name}_nocontext.wav"})
    bar.close()
    per_bpm = [{"bpm": bpm, "f_measure": _mean([r for r in rows if r["bpm"] == bpm], "f_measure"),
                "f_measure_nocontext": _mean([r for r in rows if r["bpm"] == bpm], "f_measure_nocontext")} for bpm in bpms]
    return {"experiment": "tempo", "prompt": prompt, "seconds": seconds, "bpms": list(bpms), "seeds": seeds,
            "tracker": tracker, "beat_window_s": BEAT_WINDOW, "rows": rows, "per_bpm": per_bpm,
            "mean": _mean(rows, "f_measure"), "mean_nocontext": _mean(rows, "f_measure_nocontext")}


# ---- the accompaniment experiment -----------------------------------------------------------------
@dataclass
class SongWindow:
    """`seconds` of one held-out song: the context (other stems' mix), the reference target stem
    and the song's beats in that span (times from the window's start)."""
    song: str
    start: float
    context: np.ndarray
    reference: np.ndarray
    beats: np.ndarray
    prompt: str
    context_stems: list = field(default_factory=list)


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
    return SongWindow(song.name, t0, context, stems[target][span].astype(np.float32), inside, song.caption, others)


def accompany_windows(data_dir, target: str, n_songs: int | None, seconds: float, val_fraction: float = 0.1,
                      split_seed: int = 0, tracker: str = "librosa", sample_rate: int = SAMPLE_RATE) -> list[SongWindow]:
    """Up to `n_songs` usable held-out song windows (all when None)."""
    check_seconds(seconds)
    windows = []
    for song in held_out_songs(data_dir, target, val_fraction, split_seed):
        if n_songs is not None and len(windows) >= n_songs:
            break
        w = song_window(song, target, seconds, sample_rate, tracker)
        if w is not None:
            windows.append(w)
    if not windows:
        raise EvalError(f"no usable held-out song in {data_dir}: none has {seconds:g} s where '{target}' and a context stem play")
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
                         batch_size: int = 8, val_fraction: float = 0.1, split_seed: int = 0, progress: bool = True) -> dict:
    """STAGE on held-out songs: the target stem generated with the other stems as context and, as the
    baseline, from the prompt alone; each scored against the song's beats (the reference stem too,
    as a ceiling), and FAD/KAD (codec latents) of each set of generated stems against the reference
    stems. prompt None: each song's caption.txt (else ""). The held-out songs are those of
    split_songs(val_fraction, split_seed) (see train_split). Writes the audio under out_dir/audio;
    returns the results."""
    from ..io.audio import save_audio

    sr = model.sample_rate
    windows = accompany_windows(data_dir, target, n_songs, seconds, val_fraction, split_seed, tracker, sr)
    n_frames = round(seconds * model.codec.frame_rate)
    prompts = [w.prompt if prompt is None else prompt for w in windows]
    bar = tqdm(total=2 * len(windows), desc="accompany: stems generated", unit="stem", disable=not progress)
    stems, baseline = _generate(model, [w.context for w in windows], prompts, n_frames, sampling, seed, batch_size, bar)
    bar.close()
    audio_dir = Path(out_dir) / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for w, stem, plain, text in zip(windows, stems, baseline, prompts):
        name = _safe(w.song)
        reference = w.reference[: len(stem)]
        for suffix, audio in (("generated", stem), ("nocontext", plain), ("reference", reference),
                              ("context", w.context), ("mix", stem + w.context[: len(stem)])):
            save_audio(audio_dir / f"{name}_{suffix}.wav", audio, sr)
        rows.append({"song": w.song, "start_s": round(w.start, 3), "prompt": text, "context_stems": w.context_stems,
                     **_scored("", beat_scores(stem, sr, w.beats, tracker)),
                     **_scored("_nocontext", beat_scores(plain, sr, w.beats, tracker)),
                     **_scored("_reference", beat_scores(reference, sr, w.beats, tracker)),
                     "reference_beats": _round(w.beats), "audio": f"audio/{name}_generated.wav",
                     "audio_nocontext": f"audio/{name}_nocontext.wav"})
    ref_emb = codec_embeddings(model, [w.reference[: n_frames * model.codec.hop] for w in windows])
    gen_emb, plain_emb = codec_embeddings(model, stems), codec_embeddings(model, baseline)
    return {"experiment": "accompany", "target": target, "seconds": seconds, "seed": seed, "tracker": tracker,
            "beat_window_s": BEAT_WINDOW, "n_songs": len(rows), "rows": rows,
            "mean": _mean(rows, "f_measure"), "mean_nocontext": _mean(rows, "f_measure_nocontext"),
            "mean_reference": _mean(rows, "f_measure_reference"),
            "fad_encodec": fad(gen_emb, ref_emb), "kad_encodec": kad(gen_emb, ref_emb),
            "fad_encodec_nocontext": fad(plain_emb, ref_emb), "kad_encodec_nocontext": kad(plain_emb, ref_emb),
            "embedding": "the model's EnCodec encoder latents before quantisation, one row per frame"}


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
    """report.png: beat F-measure per BPM (or per song) with and without the context, and the first
    row's stem as a beat plot (onset envelope, reference beats, tracked beats)."""
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
    label = f"{row['bpm']:g} BPM, seed {row['seed']}" if "bpm" in row else row["song"]
    f1 = "n/a" if row["f_measure"] is None else f"{row['f_measure']:.2f}"
    bottom.set(title=f"Example: {label} (F-measure {f1})", xlabel="time (s)", ylabel="normalised onset strength")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = out_dir / "report.png"
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def _plot_scores(ax, results: dict):
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    if results["experiment"] == "tempo":
        x = [r["bpm"] for r in results["per_bpm"]]
        for key, style, label in (("f_measure", "o-", "with the click track"), ("f_measure_nocontext", "s--", "text only (no context)")):
            ax.plot(x, [nan(r[key]) for r in results["per_bpm"]], style, label=label)
            ax.scatter([r["bpm"] for r in results["rows"]], [nan(r[key]) for r in results["rows"]], s=8, alpha=0.4)
        ax.set(xlabel="click track tempo (BPM)", title=f"Beat F-measure per tempo ({len(results['seeds'])} seed(s) each; dots: single stems)")
    else:
        x = np.arange(len(results["rows"]))
        for i, (key, label) in enumerate((("f_measure", "with the context"), ("f_measure_nocontext", "text only (no context)"),
                                          ("f_measure_reference", "reference stem"))):
            ax.bar(x + (i - 1) * 0.27, [nan(r[key]) for r in results["rows"]], 0.27, label=label)
        ax.set_xticks(x, [r["song"][:14] for r in results["rows"]], rotation=30, fontsize=7)
        fads = [("n/a" if results[k] is None else f"{results[k]:.3g}") for k in ("fad_encodec", "fad_encodec_nocontext")]
        ax.set(title=f"Beat F-measure per held-out song (FAD on codec latents: {fads[0]} with the context, {fads[1]} without)")
    ax.set(ylabel="F-measure (70 ms)", ylim=(0, 1.05))
    ax.legend(fontsize=8)
