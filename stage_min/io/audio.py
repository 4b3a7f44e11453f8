"""Audio files in and out: any format soundfile reads -> mono float32 at the model's rate, and back.

Resampling uses soxr (a maintained, high-quality resampler) rather than a hand-written filter.
"""
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .loading import with_default_mode


class AudioError(Exception):
    """An input file cannot be used; the message says why."""


# the formats audio is written in: a short list that soundfile writes correctly at 32 kHz mono
OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}


def output_formats() -> list[str]:
    """The suffixes of OUTPUT_FORMATS that this soundfile (libsndfile build) can write."""
    have = sf.available_formats()
    return [s for s, f in OUTPUT_FORMATS.items() if f in have and sf.check_format(f, sf.default_subtype(f))]


def check_input_file(path: str | Path) -> Path:
    """A regular, readable file, else AudioError saying what it is instead. Runs before any read:
    a FIFO or a device would block or never end."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as e:  # a symlink loop, a path through a file, ...
        raise AudioError(f"{path}: {e.strerror or type(e).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(f"{path}: not a regular file (a FIFO, socket or device); give an audio file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise AudioError(f"{path}: cannot open it ({e.strerror or type(e).__name__})") from None
    return path


def _finite(audio: np.ndarray, path, after: str) -> np.ndarray:
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples{after}")
    return audio


def load_audio(path: str | Path, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Read any soundfile format, mix down to mono, resample. Returns float32 (samples,).
    max_seconds: read only the file's first part (a partial read: a long file is never loaded whole).
    The samples are checked to be finite after each step: huge values can overflow in the mix-down
    or ring into infinity in the resampler."""
    path = check_input_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            frames = -1 if max_seconds is None else int(np.ceil(max_seconds * sr)) + 1
            data = f.read(frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    _finite(data, path, "")
    with np.errstate(over="ignore", invalid="ignore"):
        mono = _finite(data.mean(axis=1), path, " once mixed down to mono")
        if sr != sample_rate:
            mono = _finite(soxr.resample(mono, sr, sample_rate).astype(np.float32), path, f" once resampled to {sample_rate} Hz")
    return mono


def audio_seconds(path: str | Path) -> float:
    """A file's duration from its header, without reading the samples."""
    try:
        info = sf.info(str(check_input_file(path)))
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return info.frames / info.samplerate


def peak_normalize(audio: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Scale down only when the signal would clip; quieter audio is left as it is."""
    top = float(np.abs(audio).max()) if audio.size else 0.0
    return audio * (peak / top) if top > peak else audio


# ---- the mix: song and stems level-matched ---------------------------------------------------------
MIX_LOUDNESS_DB = -20.0  # each part's loudness in the mix (dBFS RMS over its non-silent 400 ms blocks)
MIX_CEILING = 0.89  # -1 dBFS: the limiter's ceiling
SILENT_DB = -60.0  # a part quieter than this is left as it is (silence is not brought up to -20 dB)


def loudness_db(audio: np.ndarray, sample_rate: int) -> float:
    """A gated RMS level in dBFS, like EBU R128's gating without its K-weighting: the RMS over the
    400 ms blocks no more than 20 dB under the loudest block, so a stem's silences and a song's fade
    do not pull its level down. -inf for silence."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    if not audio.size:
        return float("-inf")
    block = max(1, int(0.4 * sample_rate))
    n = max(1, len(audio) // block)
    power = np.array([np.mean(b ** 2) for b in np.array_split(audio[: max(block, n * block)], n)])
    if power.max() <= 0:
        return float("-inf")
    gated = power[power >= power.max() * 10 ** (-20 / 10)]
    return float(10 * np.log10(gated.mean()))


def limit(audio: np.ndarray, sample_rate: int, ceiling: float = MIX_CEILING, release_s: float = 0.1) -> np.ndarray:
    """A peak limiter: the gain drops ahead of each peak (one 5 ms block of look-ahead) just enough
    that no sample exceeds `ceiling`, and comes back up over `release_s`. Only the loud moments are
    turned down, never the whole signal."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not audio.size or float(np.abs(audio).max()) <= ceiling:
        return audio
    hop = max(1, int(0.005 * sample_rate))
    n = -(-len(audio) // hop)
    padded = np.pad(np.abs(audio), (0, n * hop - len(audio)))
    peak = padded.reshape(n, hop).max(axis=1)
    held = np.maximum(peak, np.maximum(np.r_[0.0, peak[:-1]], np.r_[peak[1:], 0.0]))  # each block and its neighbours
    gain = np.minimum(1.0, ceiling / np.maximum(held, 1e-12))
    rise = np.exp(np.log(1e3) * hop / (release_s * sample_rate))  # back up by 60 dB per release_s at most
    for i in range(1, n):  # the release: the gain may fall at once, it rises slowly
        gain[i] = min(gain[i], gain[i - 1] * rise)
    # gain at each block's centre, linear in between: a sample's two neighbouring block gains both
    # hold its own peak below the ceiling, so their interpolation does too
    centres = (np.arange(n) + 0.5) * hop
    smooth = np.interp(np.arange(len(audio)), centres, gain).astype(np.float32)
    return np.clip(audio * smooth, -ceiling, ceiling)


def mix(song, stems, sample_rate: int) -> np.ndarray:
    """The song and its stems as one track where each can be heard. The rule: every part (the song or
    click track, and each stem) is brought to the same loudness, MIX_LOUDNESS_DB (gated RMS,
    loudness_db); the parts are summed; a peak limiter (limit) holds the sum under -1 dBFS. Never a
    rescale of the whole sum, which would leave each part as unbalanced as it came (a stem far above
    full scale buried the song 22 dB under it). A silent part stays silent. The mix is as long as the
    longest stem (the song cut or padded to it); song may be None (the stems alone)."""
    stems = list(stems.values()) if isinstance(stems, dict) else list(stems)
    parts = [np.asarray(a, dtype=np.float64).reshape(-1) for a in stems]
    n = max((len(a) for a in parts), default=0)
    if song is not None:
        song = np.asarray(song, dtype=np.float64).reshape(-1)
        n = n or len(song)
        parts.insert(0, np.pad(song[:n], (0, max(0, n - len(song)))))
    out = np.zeros(n, dtype=np.float64)
    for part in parts:
        if not np.isfinite(part).all():
            raise AudioError("cannot mix audio with NaN or infinite samples")
        level = loudness_db(part, sample_rate)
        gain = 10 ** ((MIX_LOUDNESS_DB - level) / 20) if level > SILENT_DB else 1.0
        out[: len(part)] += part * gain
    return limit(out.astype(np.float32), sample_rate)


def save_audio(path: str | Path, audio: np.ndarray, sample_rate: int):
    """Write in the format the suffix names (16-bit WAV, FLAC, OGG Vorbis, MP3) through a temporary
    name, then rename, so that an interrupted write never leaves a half file under the real name."""
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower(), "WAV")
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not np.isfinite(audio).all():
        raise AudioError(f"{path}: refusing to write audio with NaN or infinite samples")
    audio = peak_normalize(audio)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            sf.write(tmp, audio, sample_rate, format=fmt)
            with_default_mode(tmp)
            os.replace(tmp, path)
        except (sf.LibsndfileError, sf.SoundFileRuntimeError, OSError) as e:  # a full disk, a quota
            reason = (getattr(e, "error_string", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__)
            raise AudioError(f"{path}: cannot write it ({reason.splitlines()[0]}; is the disk full?)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path):
    """Fail before any work if the output cannot be written."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AudioError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise AudioError(f"{path}: output folder {folder} is not writable")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder; give a file name such as out.wav")
    if path.exists() and not path.is_file():
        raise AudioError(f"{path}: exists and is not a regular file")
    formats = output_formats()
    if path.suffix.lower() not in formats:
        raise AudioError(f"{path}: cannot write {path.suffix or 'a file without a suffix'}; "
                         f"name it {' or '.join(', '.join(formats).rsplit(', ', 1))}")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same resolved path, or the same inode (a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):  # realpath never raises (a symlink loop stays as it is)
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
