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
        sf.write(tmp, audio, sample_rate, format=fmt)
        with_default_mode(tmp)
        os.replace(tmp, path)
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
