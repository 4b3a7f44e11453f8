"""Training examples for STAGE: (context audio, target stem codes, caption) windows from a stems dataset.

Two folder layouts, one song per folder (found up to one level down, so `moisesdb/moisesdb_v0.1/`
works as a root as well as its parent):
- plain:    song/drums.wav, song/bass.wav, song/other.wav, ...      (stem = file name)
- MoisesDB: song/data.json, song/drums/<uuid>.wav, song/drums/<uuid2>.wav, ...
                                                                    (stem = folder; its files summed)
Optional per song: `caption.txt` (the text prompt; else the original's caption from its auto-labels in
`features.json`, see train/captions.py) and `beats.txt` (beat annotations, format below).
A file called mixture/mix.* is not a stem and is ignored.

The song-level work is done once and cached on disk: the per-frame peak of every stem (to find
silence without reading audio again) and the beats. A window is read from the files (partial reads),
augmented, and its target and context are encoded on the device by the training loop, each window on
its own as the original STAGE does (EnCodec's LSTM sees only the window, as at inference).

beats.txt: one beat per line, `<time in seconds> [<position in bar>]`, position 1 = downbeat (the
common `.beats` annotation format). Lines starting with # are comments. Without positions, every
4th beat from the first is taken as a downbeat.
"""
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from . import augment
from .captions import caption_from_features as original_caption_of
from ..io.audio import AudioError, load_audio
from .options import PROBABILITY, Rule, above, check_options, one_of, option, within
from .beats import TRACKER_ID, TRACKERS, track  # one beat tracker for training data and evaluation
from ..io.metronome import click_track

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}
NOT_STEMS = {"mixture", "mix"}
# MoisesDB's instrument folders; other subfolders count as stems only when the song has MoisesDB's
# data.json, so that a folder of songs is never taken for one song with odd stems
MOISESDB_STEMS = {"vocals", "bass", "drums", "guitar", "other_keys", "piano", "percussion", "bowed_strings",
                  "wind", "other_plucked", "other"}
# The original's context stems (docs/original.md#data): percussion, wind, other_plucked and vocals never
# appear in a context, so that e.g. percussion never leaks into a drums context
STAGE_CONTEXT_STEMS = ("drums", "bass", "guitar", "other_keys", "piano", "bowed_strings", "other")
# 2: no numpy arrays in the file, so that it loads with weights_only=True; 3: no codes (targets are
# encoded per window), peaks of the whole song and downbeats; 4: per-frame signed maxima too
CACHE_VERSION = 4
SILENCE_RULES = ("max", "peak")
ENCODE_PRECISIONS = ("fp32", "fp16")
RETRIES = ("same-song", "any-song")
AUGMENT_ENGINES = augment.ENGINES  # named here: the field `augment` hides the module inside DataConfig


def encode_autocast(device, precision: str = "fp32"):
    """The context training windows are encoded in: fp16 autocast on the device for "fp16" (the
    original's: its whole step, encoding included, runs under Lightning's 16-mixed), else none."""
    import contextlib

    if precision == "fp16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.float16)
    return contextlib.nullcontext()


class DataError(Exception):
    """The dataset cannot be used; the message says why."""


@dataclass
class DataConfig:
    target: str = "drums"  # train.py --target (required), --context-stems and --exclude are written in its parser
    context_stems: tuple | None = STAGE_CONTEXT_STEMS  # stems a context may use (minus the target); None: any
    exclude: tuple = ()  # stems never in a context (train.py's deprecated --exclude: any stem but these)
    target_seconds: float = option(10.0, "window length (the original: 10 s); shorter for CPU toys", above(0))
    p_full_context: float = option(0.05, "the context is the whole window with this probability (the original: 0.05); "
                                   "0 with --context-min = --context-max for a fixed context length", PROBABILITY)
    context_min: float = option(5.0, "else a prefix of the window, uniform in [min, max] seconds")
    context_max: float = option(10.0, "see --context-min")
    context_step: float = option(0.0, "0: any whole number of frames (the original: any length); > 0: lengths on this grid "
                                 "(>= 0.02 s, one frame), so that contexts of equal length are encoded as one batch "
                                 "(faster, less varied)", Rule(lambda v: v == 0 or v >= 0.02, "must be 0 (any length) or >= 0.02 s (one frame)"))
    p_metronome: float = option(0.5, "context replaced by a click track on the song's beats", PROBABILITY)
    # a copy task (0 in the original): a from-scratch toy first learns where context frame t sits (a fixed
    # offset back) from a task where that is all it must learn
    p_copy_context: float = option(0.0, "context = the target stem itself (a copy task; the original: 0): a from-scratch "
                                   "toy learns first where context frame t sits, then what to take from it (stage_min.toy)", PROBABILITY)
    silence: float = option(0.01, "a stem whose level over the window (--silence-rule) is below this is silent",
                            within(0, 1, closed=False))
    silence_rule: str = option("max", "the level --silence compares: max, the signed maximum of the samples (the "
                               "original's rule); peak, the maximum of |samples| (polarity-blind: a stem whose loud "
                               "half-waves are negative is not taken for silence)", one_of(*SILENCE_RULES), choices=SILENCE_RULES)
    retry: str = option("same-song", "a window with a silent target: same-song (the original's) draws new start positions "
                        "in the same song until the target and at least one other context stem play, click windows "
                        "included; any-song draws a new song each try, and a click window needs only an audible target",
                        one_of(*RETRIES), choices=RETRIES)
    val_fraction: float = option(0.1, "held-out songs (at least one when there are >= 2)", within(0, 1, closed=False))
    augment: bool = option(True, "no speed or pitch changes (the original augments; off for a faster CPU run, or for data "
                           "whose tempo and key must stay)", flag="--no-augment")
    p_speed: float = option(0.5, "augmentation: chance of a speed change", PROBABILITY)
    speed_min: float = option(0.8, "speed change: lowest Rubber Band time ratio (window duration / song segment "
                              "duration; < 1 is faster), in (0, 4]")
    speed_max: float = option(1.2, "speed change: highest time ratio")
    p_pitch: float = option(0.5, "augmentation: chance of a pitch shift", PROBABILITY)
    pitch_semitones: int = option(4, "pitch shift drawn in [-n, n] whole semitones", within(0, 12))
    augment_engine: str = option("pedalboard", "Rubber Band through pedalboard, with the original's settings, or "
                                 "pylibrb, the original's own binding (pip install -e \".[parity]\")",
                                 one_of(*AUGMENT_ENGINES), choices=AUGMENT_ENGINES)
    encode_precision: str = option("fp32", "fp16: encode training windows inside fp16 autocast, as the original under "
                                   "Lightning's 16-mixed (a few %% of codes differ from fp32 ones, docs/training.md); "
                                   "fp32: as inference", one_of(*ENCODE_PRECISIONS), choices=ENCODE_PRECISIONS)
    beat_tracker: str = option("librosa", "for songs without beats.txt: librosa (offline; downbeats by a low-frequency "
                               "rule) or beat_this (Beat This!, as the original's beatthis.npz suggests; pip install "
                               "beat-this, downloads its checkpoint once)", one_of(*TRACKERS), choices=TRACKERS)

    def check(self):
        """What ties options together (each option's own rule: options.check_options)."""
        check_options(self)
        if not self.target:
            raise ValueError("--target is empty")
        if not 0 < self.context_min <= self.context_max <= self.target_seconds:
            raise ValueError(f"need 0 < --context-min <= --context-max <= --target-seconds, got "
                             f"{self.context_min:g}, {self.context_max:g}, {self.target_seconds:g}")
        if not 0 < self.speed_min <= self.speed_max <= 4:
            raise ValueError(f"need 0 < --speed-min <= --speed-max <= 4 (a time ratio), got {self.speed_min:g}, {self.speed_max:g}")
        if self.target in self.exclude:
            raise ValueError(f"--target {self.target} is also in --exclude")
        if self.context_stems is not None and not self.context_stems:
            raise ValueError("--context-stems is empty")

    def check_stem_names(self, songs: list["Song"]):
        """Every name in --context-stems/--exclude must be a MoisesDB stem or a stem of some song:
        a typo would otherwise silently leave a stem out of every context."""
        known = MOISESDB_STEMS | {s for song in songs for s in song.stems}
        for flag, names in (("--context-stems", self.context_stems or ()), ("--exclude", self.exclude)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise DataError(f"{flag}: unknown stem {unknown[0]!r} (not a MoisesDB stem and in no song of the data; "
                                f"known: {', '.join(sorted(known))})")

    def may_be_context(self, stem: str) -> bool:
        return stem != self.target and stem not in self.exclude and (self.context_stems is None or stem in self.context_stems)


@dataclass
class Song:
    name: str
    folder: Path
    stems: dict  # stem name -> list of audio files (summed)
    caption: str = ""
    beats_file: Path | None = None


# ---- finding songs ------------------------------------------------------------------------------
def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTS and not p.name.startswith("."))


def _song_stems(folder: Path) -> dict:
    stems = {}
    for f in _audio_files(folder):  # plain layout
        if f.stem.lower() not in NOT_STEMS:
            stems.setdefault(f.stem.lower(), []).append(f)
    moises = (folder / "data.json").is_file()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):  # MoisesDB layout
        if not moises and sub.name.lower() not in MOISESDB_STEMS:
            continue
        files = _audio_files(sub)
        if files and sub.name.lower() not in NOT_STEMS:
            stems.setdefault(sub.name.lower(), []).extend(files)
    return stems


def _song_caption(folder: Path) -> str:
    """caption.txt as is; else the original's caption built from its auto-labels in features.json
    (train.captions.original_caption); else no text."""
    if (folder / "caption.txt").is_file():
        return (folder / "caption.txt").read_text(errors="replace").strip()
    if (folder / "features.json").is_file():
        try:
            return original_caption_of(folder / "features.json")
        except ValueError as e:
            print(f"warning: {e}; no caption for this song", file=sys.stderr)
    return ""


def find_songs(root) -> list[Song]:
    """All song folders under root (depth 1, else depth 2). Raises DataError when there are none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is a file; --data wants a folder with one subfolder per song")

    def songs_in(folder):
        out = []
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            stems = _song_stems(d)
            if stems:
                caption = _song_caption(d)
                beats = d / "beats.txt"
                out.append(Song(d.name, d, stems, caption, beats if beats.is_file() else None))
        return out

    songs = songs_in(root)
    if not songs:
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            songs += songs_in(d)
    if not songs:
        raise DataError(f"no songs in {root}: expected one folder per song holding stems "
                        f"(song/drums.wav, ... or MoisesDB's song/drums/<id>.wav, ...)")
    return songs


def split_songs(songs: list[Song], val_fraction: float, seed: int) -> tuple[list[Song], list[Song]]:
    """Held-out songs chosen by a seeded shuffle of the sorted names: the same split on every run."""
    if len(songs) < 2 or val_fraction == 0:
        return songs, []
    order = np.random.default_rng(seed).permutation(len(songs))
    n_val = max(1, int(round(val_fraction * len(songs))))
    val = {int(i) for i in order[:n_val]}
    return [s for i, s in enumerate(songs) if i not in val], [s for i, s in enumerate(songs) if i in val]


# ---- beats --------------------------------------------------------------------------------------
def parse_beats(text: str) -> tuple[np.ndarray, np.ndarray]:
    """beats.txt content -> (times (N,) seconds, downbeat flags (N,) bool)."""
    times, positions = [], []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            times.append(float(parts[0]))
            positions.append(int(float(parts[1])) if len(parts) > 1 else None)
        except ValueError:
            raise ValueError(f"line {n}: expected '<seconds> [<position in bar>]', got {line!r}") from None
    t = np.asarray(times, dtype=np.float64)
    if len(t) and (not np.isfinite(t).all() or (np.diff(t) <= 0).any() or t[0] < 0):
        raise ValueError("beat times must be finite, >= 0 and increasing")
    if positions and all(p is not None for p in positions):
        down = np.asarray([p == 1 for p in positions])
    else:
        down = np.arange(len(t)) % 4 == 0
    return t, down


def format_beats(times, positions) -> str:
    """The beats.txt format: one `<seconds> <position in bar>` per line, 1 = downbeat."""
    return "".join(f"{t:.4f} {p}\n" for t, p in zip(times, positions))


def track_beats(mixture: np.ndarray, sample_rate: int, tracker: str = "librosa", device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(beat times (N,) s, downbeat flags (N,)) of a mixture (stage_min.train.beats, which evaluation uses too)."""
    return track(tracker, mixture, sample_rate, str(device))


# ---- the per-song cache -------------------------------------------------------------------------
def file_key(paths) -> list:
    """What identifies a file's content cheaply: path, size and modification time."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


@dataclass
class SongData:
    """What training needs of one song, all on the frame grid of the codec."""
    song: Song
    target: str  # the target stem's name
    peaks: dict  # stem -> (T,) float32 peak of |audio| in each frame
    beats: np.ndarray  # (N,) seconds
    downbeats: np.ndarray  # (N,) bool
    maxes: dict | None = None  # stem -> (T,) float32 signed maximum of the audio in each frame

    def level(self, stem: str, f0: int, n: int, rule: str = "max") -> float:
        """The stem's level over frames [f0, f0 + n) by the silence rule (DataConfig.silence_rule)."""
        table = self.maxes if rule == "max" and self.maxes is not None else self.peaks
        return float(table[stem][f0:f0 + n].max())

    @property
    def n_frames(self) -> int:
        return len(self.peaks[self.target])


def _frame_peaks(audio: np.ndarray, hop: int, n_frames: int, signed: bool = False) -> np.ndarray:
    """Per frame: the peak |audio|, or (signed) the maximum sample (zeros past the end count)."""
    padded = np.zeros(n_frames * hop, dtype=np.float32)
    n = min(len(audio), len(padded))
    padded[:n] = audio[:n] if signed else np.abs(audio[:n])
    return padded.reshape(n_frames, hop).max(axis=1)


class Stats:
    """Counts of what was skipped, for the one-line summary."""

    def __init__(self):
        self.bad_files = 0
        self.no_target = 0
        self.too_short = 0

    def warn_file(self, msg):
        self.bad_files += 1
        from tqdm import tqdm

        tqdm.write(f"warning: skipping {msg}", file=sys.stderr)  # above train.py's bar, not on its line

    def summary(self) -> str:
        return (f"{self.bad_files} unreadable file(s) skipped, {self.no_target} song(s) without the target stem, "
                f"{self.too_short} song(s) shorter than a window")


def load_stem(files: list[Path], sample_rate: int) -> np.ndarray:
    """Sum of the files of one stem (MoisesDB keeps e.g. each drum track in its own file)."""
    tracks = [load_audio(f, sample_rate) for f in files]
    out = np.zeros(max(len(t) for t in tracks), dtype=np.float32)
    for t in tracks:
        out[:len(t)] += t
    return out


def prepare_song(song: Song, cfg: DataConfig, codec, device, cache_dir: Path, stats: Stats) -> SongData | None:
    """Cached song data (per-frame peaks of every stem, beats), computed and cached atomically on a
    miss. None when the song has no (readable) target stem. `codec` gives the sample rate and hop."""
    sr, hop = codec.sample_rate, codec.hop
    usable = {}
    for stem, files in song.stems.items():  # a file that vanished or cannot be stat'ed is a bad file
        try:
            file_key(files)
            usable[stem] = files
        except OSError as e:
            stats.warn_file(f"{song.name}/{stem}: {e}")
    # how beats are found is part of the key: a cache made with beats.txt holds no tracked beats,
    # and tracked beats are redone when the tracker or its settings change
    tracker = None if song.beats_file is not None else cfg.beat_tracker
    tracker_id = None if tracker is None else TRACKER_ID if tracker == "librosa" else tracker
    key_src = json.dumps([CACHE_VERSION, sr, hop, tracker_id, {s: file_key(f) for s, f in sorted(usable.items())}])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = cache_dir / f"{song.name}.{key}.pt"
    cached = None
    if path.exists():
        from ..io.loading import LoadError, safe_torch_load

        try:  # weights_only: a cache file planted in the data folder cannot run code
            cached = safe_torch_load(path)
        except LoadError:
            cached = None  # a broken (or unsafe) cache file is just recomputed
    if cached is None:
        cached = _song_summary(song, usable, sr, hop, tracker, device, stats)
        from ..io.loading import write_atomic
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: torch.save(cached, p))
    else:
        for _ in range(cached["bad"]):  # bad files are reported on every run, not only the first
            stats.warn_file(f"{song.name}: a stem file that could not be read (cached)")
    if cfg.target not in cached["peaks"]:
        stats.no_target += 1
        return None
    if song.beats_file is not None:
        try:
            beats, down = parse_beats(song.beats_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            stats.warn_file(f"{song.beats_file}: {e}")
            beats, down = np.zeros(0), np.zeros(0, dtype=bool)
    else:
        beats, down = cached["beats"].numpy(), cached["downbeats"].numpy()
    peaks = {s: p.numpy() for s, p in cached["peaks"].items()}
    maxes = {s: p.numpy() for s, p in cached["maxes"].items()} if "maxes" in cached else None
    song = Song(song.name, song.folder, {s: f for s, f in usable.items() if s in peaks}, song.caption, song.beats_file)
    return SongData(song, cfg.target, peaks, beats, down, maxes)


def _song_summary(song: Song, files: dict, sr: int, hop: int, tracker: str | None, device, stats: Stats) -> dict:
    """Read every stem once: per-frame peaks, and beats tracked on the mixture when there is no beats.txt."""
    audio = {}
    for stem, f in files.items():
        try:
            audio[stem] = load_stem(f, sr)
        except AudioError as e:
            stats.warn_file(str(e))
    out = {"bad": len(files) - len(audio), "peaks": {}, "maxes": {}, "beats": torch.zeros(0, dtype=torch.float64),
           "downbeats": torch.zeros(0, dtype=torch.bool)}
    if not audio:
        return out
    n = max(len(a) for a in audio.values())
    T = -(-n // hop)
    out["peaks"] = {s: torch.from_numpy(_frame_peaks(a, hop, T)) for s, a in audio.items()}
    out["maxes"] = {s: torch.from_numpy(_frame_peaks(a, hop, T, signed=True)) for s, a in audio.items()}
    if tracker is not None:  # no annotation: track the beats on the mixture, once
        mix = np.zeros(n, dtype=np.float32)
        for a in audio.values():
            mix[:len(a)] += a
        beats, down = track_beats(mix, sr, tracker, device)
        out["beats"], out["downbeats"] = torch.from_numpy(np.asarray(beats, np.float64)), torch.from_numpy(np.asarray(down, bool))
    return out


# ---- windows ------------------------------------------------------------------------------------
def read_segment(files: list[Path], start: float, duration: float, sample_rate: int) -> np.ndarray:
    """`duration` seconds from `start` of the sum of `files`, mono at `sample_rate`, zero-padded
    past the end. Partial reads: a window never loads the whole song."""
    n_out = int(round(duration * sample_rate))
    out = np.zeros(n_out, dtype=np.float32)
    for f in files:
        try:
            with sf.SoundFile(str(f)) as fh:
                fsr = fh.samplerate
                first = int(round(start * fsr))
                if first >= fh.frames:
                    continue
                fh.seek(first)
                data = fh.read(int(np.ceil(duration * fsr)) + 1, dtype="float32", always_2d=True).mean(axis=1)
        except Exception as e:
            raise AudioError(f"{f}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if fsr != sample_rate:
            data = soxr.resample(data, fsr, sample_rate).astype(np.float32)
        n = min(n_out, len(data))
        out[:n] += data[:n]
    return out


@dataclass
class Example:
    song: str
    start: int  # first frame of the window's song segment
    target: np.ndarray  # target stem audio of the window (n_target frames), augmented
    context: np.ndarray  # context audio, a prefix of the window (whole frames), augmented alike
    caption: str
    metronome: bool
    context_stems: list = field(default_factory=list)
    aug: augment.Augmentation = augment.Augmentation()


def context_frames(seconds: float, frame_rate: float, n_target: int) -> int:
    """A context of `seconds` in whole frames (as the encoder takes them), at least one, at most the window."""
    return min(n_target, max(1, int(seconds * frame_rate)))


class StemWindows:
    """Draws random training windows. Every draw takes its own numpy Generator, so the training
    loop can derive it from (seed, step, sample index): runs are reproducible, resumable without
    saving a data-loader state, and the same whatever the number of processes.

    A window (as the original STAGE, docs/original.md#data): a song segment whose target stem is not
    silent (level >= --silence over the segment, DataConfig.silence_rule) and, with retry "same-song"
    (the default), where at least one other context stem is not silent either, start positions being
    drawn again in the same song until that holds (click windows too); with augmentation, a segment of target_seconds / ratio
    seconds, stretched and pitch-shifted to target_seconds; the context is the whole window with
    probability p_full_context, else a prefix of uniform length in [context_min, context_max]; it is a
    click track on the song's beats with probability p_metronome, else the sum of a random non-empty
    subset of the other stems allowed in a context that are not silent over the segment."""

    def __init__(self, songs: list[SongData], cfg: DataConfig, frame_rate: float, sample_rate: int, stats: Stats | None = None):
        self.cfg, self.frame_rate, self.sample_rate = cfg, frame_rate, sample_rate
        self.hop = int(round(sample_rate / frame_rate))
        self.n_target = int(round(cfg.target_seconds * frame_rate))
        self.context_lengths = None  # in frames: None = any whole number of frames in [min, max]
        if cfg.context_step > 0:
            n = int(np.floor((cfg.context_max - cfg.context_min) / cfg.context_step + 1e-9))
            grid = [cfg.context_min + i * cfg.context_step for i in range(n + 1)] + [cfg.context_max]
            self.context_lengths = sorted({max(1, int(round(s * frame_rate))) for s in grid})
        self.stats = stats or Stats()
        self.songs = []
        for s in songs:
            if s.n_frames >= self.n_target:
                self.songs.append(s)
            else:
                self.stats.too_short += 1
        if not self.songs:
            raise DataError(f"no song has a '{cfg.target}' stem of at least {cfg.target_seconds:g} s")

    def _context_frames(self, rng: np.random.Generator) -> int:
        cfg = self.cfg
        full, u = rng.random(), rng.random()  # always two draws: later draws do not depend on the branch
        if full < cfg.p_full_context:
            return self.n_target
        if self.context_lengths is not None:
            return self.context_lengths[min(int(u * len(self.context_lengths)), len(self.context_lengths) - 1)]
        return context_frames(cfg.context_min + u * (cfg.context_max - cfg.context_min), self.frame_rate, self.n_target)

    def draw(self, rng: np.random.Generator, max_tries: int = 50) -> Example:
        cfg = self.cfg
        same_song = cfg.retry == "same-song"
        for _ in range(max_tries):
            sd = self.songs[int(rng.integers(len(self.songs)))]
            aug = augment.draw(rng, cfg.p_speed, cfg.speed_min, cfg.speed_max, cfg.p_pitch, cfg.pitch_semitones) \
                if cfg.augment else augment.Augmentation()
            n_src = min(sd.n_frames, int(np.ceil(self.n_target / aug.ratio)))  # song frames the window is made from
            for _ in range(max_tries if same_song else 1):  # the original retries positions in the same song
                f0 = int(rng.integers(0, sd.n_frames - n_src + 1))
                if sd.level(cfg.target, f0, n_src, cfg.silence_rule) < cfg.silence:
                    continue  # nothing to learn from a silent target
                others = [s for s in sorted(sd.peaks) if cfg.may_be_context(s) and sd.level(s, f0, n_src, cfg.silence_rule) >= cfg.silence]
                if same_song and not others:
                    continue  # the original wants the target and at least one more stem audible
                break
            else:
                continue
            C = self._context_frames(rng)
            t0, src_seconds = f0 / self.frame_rate, self.n_target * self.hop / self.sample_rate / aug.ratio
            metronome = bool(rng.random() < cfg.p_metronome)
            chosen = []
            if cfg.p_copy_context and rng.random() < cfg.p_copy_context:  # drawn only when asked: other runs' draws stay
                metronome, chosen = False, [cfg.target]
            elif metronome:
                beats = (sd.beats - t0) * aug.ratio  # where each beat lands in the (stretched) window
                inside = (beats >= 0) & (beats < C / self.frame_rate)
                if not inside.any():
                    continue
                context = click_track(beats[inside], C * self.hop / self.sample_rate, sample_rate=self.sample_rate,
                                      downbeats=sd.downbeats[inside])
            if not metronome and not chosen:
                if not others:
                    continue
                k = int(rng.integers(1, len(others) + 1))
                chosen = [others[i] for i in sorted(rng.choice(len(others), k, replace=False))]
            try:
                target = self._window([f for f in sd.song.stems[cfg.target]], t0, src_seconds, aug)
                if not metronome:  # the whole window is augmented, then cut: context and target alike
                    context = self._window([f for s in chosen for f in sd.song.stems[s]], t0, src_seconds, aug)[:C * self.hop]
            except AudioError as e:
                self.stats.warn_file(str(e))
                continue
            return Example(sd.song.name, f0, target, context, sd.song.caption, metronome, chosen, aug)
        raise DataError(f"found no usable window in {max_tries} tries: are the '{cfg.target}' stems silent?")

    def _window(self, files: list[Path], t0: float, seconds: float, aug: augment.Augmentation) -> np.ndarray:
        audio = read_segment(files, t0, seconds, self.sample_rate)
        return augment.apply(audio, self.sample_rate, aug, self.n_target * self.hop, self.cfg.augment_engine)
