"""Training examples for STAGE: (context audio, target stem codes, caption) windows from a stems dataset.

Two folder layouts, one song per folder (found up to one level down, so `moisesdb/moisesdb_v0.1/`
works as a root as well as its parent):
- plain:    song/drums.wav, song/bass.wav, song/other.wav, ...      (stem = file name)
- MoisesDB: song/data.json, song/drums/<uuid>.wav, song/drums/<uuid2>.wav, ...
                                                                    (stem = folder; its files summed)
Optional per song: `caption.txt` (the text prompt) and `beats.txt` (beat annotations, format below).
A file called mixture/mix.* is not a stem and is ignored.

The expensive, song-level work is done once and cached on disk (`SongCache`): the target stem's
EnCodec codes, the per-frame peak of every stem (to find silence without reading audio again) and
the beat times. A window then costs a few partial file reads for the context; the context is
encoded on the device, in batches, by the training loop.

beats.txt: one beat per line, `<time in seconds> [<position in bar>]`, position 1 = downbeat (the
common `.beats` annotation format). Lines starting with # are comments. Without positions, every
4th beat from the first is taken as a downbeat.
"""
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from .audio import AudioError, load_audio
from .evaluation import TRACKER_ID, track_beats  # one beat tracker for training data and evaluation
from .metronome import click_track

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}
NOT_STEMS = {"mixture", "mix"}
# MoisesDB's instrument folders; other subfolders count as stems only when the song has MoisesDB's
# data.json, so that a folder of songs is never taken for one song with odd stems
MOISESDB_STEMS = {"vocals", "bass", "drums", "guitar", "other_keys", "piano", "percussion", "bowed_strings",
                  "wind", "other_plucked", "other"}
CACHE_VERSION = 2  # 2: no numpy arrays in the file, so that it loads with weights_only=True


class DataError(Exception):
    """The dataset cannot be used; the message says why."""


@dataclass
class DataConfig:
    target: str = "drums"
    exclude: tuple = ("vocals",)  # never part of a context (STAGE leaves vocals out)
    target_seconds: float = 10.0
    context_min: float = 5.0  # context = a prefix of the target window, this long...
    context_max: float = 10.0  # ...up to this
    context_step: float = 0.5  # lengths on a grid, so that contexts of equal length encode as one batch
    p_metronome: float = 0.5  # context replaced by a click track on the song's beats
    silence: float = 0.01  # a stem (window) whose peak is below this is silent
    val_fraction: float = 0.1  # held-out songs, at least one when there are >= 2

    def check(self):
        if not self.target:
            raise ValueError("--target is empty")
        for name in ("target_seconds", "context_min", "context_max", "context_step", "silence"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name):g}")
        if not self.target_seconds > 0:
            raise ValueError(f"--target-seconds must be > 0, got {self.target_seconds:g}")
        if not 0 <= self.silence < 1:
            raise ValueError(f"--silence must be in [0, 1) (a peak level), got {self.silence:g}")
        if not 0 < self.context_min <= self.context_max <= self.target_seconds:
            raise ValueError(f"need 0 < --context-min <= --context-max <= --target-seconds, got "
                             f"{self.context_min:g}, {self.context_max:g}, {self.target_seconds:g}")
        if not self.context_step >= 0.02:  # one codec frame: a finer grid only makes more batches
            raise ValueError(f"--context-step must be >= 0.02 s (one frame), got {self.context_step:g}")
        if not 0 <= self.p_metronome <= 1:
            raise ValueError(f"--p-metronome must be in [0, 1], got {self.p_metronome:g}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction:g}")
        if self.target in self.exclude:
            raise ValueError(f"--target {self.target} is also in --exclude")


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
                caption = (d / "caption.txt").read_text(errors="replace").strip() if (d / "caption.txt").is_file() else ""
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


# ---- the per-song cache -------------------------------------------------------------------------
def file_key(paths) -> list:
    """What identifies a file's content cheaply: path, size and modification time."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def codec_identity(codec) -> str:
    """A hash of the codec's weights and settings: codes from another codec are never reused."""
    h = hashlib.sha1(json.dumps([codec.sample_rate, codec.hop, codec.bandwidth]).encode())
    for k, v in sorted(codec.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class SongData:
    """What training needs of one song, all on the frame grid of the codec."""
    song: Song
    codes: torch.Tensor  # (K, T) target stem codes, int16 on disk / in memory
    peaks: dict  # stem -> (T,) float32 peak of |audio| in each frame
    beats: np.ndarray  # (N,) seconds
    downbeats: np.ndarray  # (N,) bool

    @property
    def n_frames(self) -> int:
        return self.codes.shape[-1]


def _frame_peaks(audio: np.ndarray, hop: int, n_frames: int) -> np.ndarray:
    padded = np.zeros(n_frames * hop, dtype=np.float32)
    n = min(len(audio), len(padded))
    padded[:n] = np.abs(audio[:n])
    return padded.reshape(n_frames, hop).max(axis=1)


def _encode_long(codec, audio: np.ndarray, device, chunk_seconds: float = 60.0) -> torch.Tensor:
    """Whole-song codes, encoded in chunks of whole frames to bound memory."""
    chunk = int(chunk_seconds * codec.frame_rate) * codec.hop
    out = []
    for start in range(0, len(audio), chunk):
        x = torch.from_numpy(audio[start:start + chunk]).to(device)[None, None]
        out.append(codec.encode(x)[0].cpu())
    return torch.cat(out, dim=-1)


class Stats:
    """Counts of what was skipped, for the one-line summary."""

    def __init__(self):
        self.bad_files = 0
        self.no_target = 0
        self.too_short = 0

    def warn_file(self, msg):
        self.bad_files += 1
        print(f"warning: skipping {msg}", file=sys.stderr)

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


def prepare_song(song: Song, cfg: DataConfig, codec, device, cache_dir: Path, codec_id: str, stats: Stats) -> SongData | None:
    """Cached song data, computed (and cached, atomically) on a miss. None when unusable."""
    sr, hop = codec.sample_rate, codec.hop
    usable = {}
    for stem, files in song.stems.items():  # a file that vanished or cannot be stat'ed is a bad file
        try:
            file_key(files)
            usable[stem] = files
        except OSError as e:
            stats.warn_file(f"{song.name}/{stem}: {e}")
    # whether beats are annotated is part of the key: a cache made with beats.txt holds no tracked beats
    # (songs with beats.txt keep their old keys; tracked beats are redone when the tracker changes)
    key_src = json.dumps([CACHE_VERSION, cfg.target, codec_id, sr, TRACKER_ID if song.beats_file is None else False,
                          {s: file_key(f) for s, f in sorted(usable.items())}])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    path = cache_dir / f"{song.name}.{cfg.target}.{key}.pt"
    cached = None
    if path.exists():
        from .loading import LoadError, safe_torch_load

        try:  # weights_only: a cache file planted in the data folder cannot run code
            cached = safe_torch_load(path)
        except LoadError:
            cached = None  # a broken (or unsafe) cache file is just recomputed
    if cached is None:
        audio = {}
        for stem, files in usable.items():
            try:
                audio[stem] = load_stem(files, sr)
            except AudioError as e:
                stats.warn_file(str(e))
        cached = {"bad": len(usable) - len(audio), "stems": sorted(audio)}
        if cfg.target in audio:
            codes = _encode_long(codec, audio[cfg.target], device).to(torch.int16)
            T = codes.shape[-1]
            cached["codes"] = codes
            cached["peaks"] = {s: torch.from_numpy(_frame_peaks(a, hop, T)) for s, a in audio.items()}
            if song.beats_file is None:  # no annotation: track the beats on the mixture, once
                n = max(len(a) for a in audio.values())
                mix = np.zeros(n, dtype=np.float32)
                for a in audio.values():
                    mix[:len(a)] += a
                cached["beats"] = torch.from_numpy(track_beats(mix, sr))
        from .loading import write_atomic
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda p: torch.save(cached, p))
    else:
        for _ in range(cached["bad"]):  # bad files are reported on every run, not only the first
            stats.warn_file(f"{song.name}: a stem file that could not be read (cached)")
    if "codes" not in cached:
        stats.no_target += 1
        return None
    if song.beats_file is not None:
        try:
            beats, down = parse_beats(song.beats_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            stats.warn_file(f"{song.beats_file}: {e}")
            beats, down = np.zeros(0), np.zeros(0, dtype=bool)
    else:
        beats = np.asarray(cached["beats"], dtype=np.float64)
        down = np.arange(len(beats)) % 4 == 0
    peaks = {s: p.numpy() for s, p in cached["peaks"].items()}
    song = Song(song.name, song.folder, {s: f for s, f in usable.items() if s in peaks}, song.caption, song.beats_file)
    return SongData(song, cached["codes"], peaks, beats, down)


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
    start: int  # first frame of the window
    codes: torch.Tensor  # (K, T) target codes
    context: np.ndarray  # context audio, a prefix of the window
    caption: str
    metronome: bool
    context_stems: list = field(default_factory=list)


class StemWindows:
    """Draws random training windows. Every draw takes its own numpy Generator, so the training
    loop can derive it from (seed, step, sample index): runs are reproducible, resumable without
    saving a data-loader state, and the same whatever the number of processes."""

    def __init__(self, songs: list[SongData], cfg: DataConfig, frame_rate: float, sample_rate: int, stats: Stats | None = None):
        self.cfg, self.frame_rate, self.sample_rate = cfg, frame_rate, sample_rate
        self.n_target = int(round(cfg.target_seconds * frame_rate))
        n = int(np.floor((cfg.context_max - cfg.context_min) / cfg.context_step + 1e-9))
        grid = [cfg.context_min + i * cfg.context_step for i in range(n + 1)] + [cfg.context_max]
        self.context_lengths = sorted({max(1, int(round(s * frame_rate))) for s in grid})  # in frames
        self.stats = stats or Stats()
        self.songs = []
        for s in songs:
            if s.n_frames >= self.n_target:
                self.songs.append(s)
            else:
                self.stats.too_short += 1
        if not self.songs:
            raise DataError(f"no song has a '{cfg.target}' stem of at least {cfg.target_seconds:g} s")

    def draw(self, rng: np.random.Generator, max_tries: int = 50) -> Example:
        cfg = self.cfg
        for _ in range(max_tries):
            sd = self.songs[int(rng.integers(len(self.songs)))]
            f0 = int(rng.integers(0, sd.n_frames - self.n_target + 1))
            if sd.peaks[cfg.target][f0:f0 + self.n_target].max() < cfg.silence:
                continue  # nothing to learn from a silent target
            C = self.context_lengths[int(rng.integers(len(self.context_lengths)))]
            t0, dur = f0 / self.frame_rate, C / self.frame_rate
            metronome = bool(rng.random() < cfg.p_metronome)
            if metronome:
                inside = (sd.beats >= t0) & (sd.beats < t0 + dur)
                if not inside.any():
                    continue
                audio = click_track(sd.beats[inside] - t0, dur, sample_rate=self.sample_rate, downbeats=sd.downbeats[inside])
                chosen = []
            else:
                others = [s for s in sorted(sd.peaks) if s != cfg.target and s not in cfg.exclude
                          and sd.peaks[s][f0:f0 + C].max() >= cfg.silence]
                if not others:
                    continue
                k = int(rng.integers(1, len(others) + 1))
                chosen = [others[i] for i in sorted(rng.choice(len(others), k, replace=False))]
                try:
                    audio = read_segment([f for s in chosen for f in sd.song.stems[s]], t0, dur, self.sample_rate)
                except AudioError as e:
                    self.stats.warn_file(str(e))
                    continue
            codes = sd.codes[:, f0:f0 + self.n_target].long()
            return Example(sd.song.name, f0, codes, audio, sd.song.caption, metronome, chosen)
        raise DataError(f"found no usable window in {max_tries} tries: are the '{cfg.target}' stems silent?")
