"""Audio files in and out: any format soundfile reads -> mono float32 at the model's rate, and back.

Resampling uses soxr (a maintained, high-quality resampler) rather than a hand-written filter.
"""
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .loading import with_default_mode


class AudioError(Exception):
    """An input file cannot be used; the message says why."""


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read any soundfile format, mix down to mono, resample. Returns float32 (samples,)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    mono = data.mean(axis=1)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate).astype(np.float32)
    return mono


def peak_normalize(audio: np.ndarray, peak: float = 0.99) -> np.ndarray:
    """Scale down only when the signal would clip; quieter audio is left as it is."""
    top = float(np.abs(audio).max()) if audio.size else 0.0
    return audio * (peak / top) if top > peak else audio


def save_audio(path: str | Path, audio: np.ndarray, sample_rate: int):
    """Write a 16-bit WAV (or what the suffix says) through a temporary name, then rename, so that
    an interrupted write never leaves a half file under the real name."""
    path = Path(path)
    audio = peak_normalize(np.asarray(audio, dtype=np.float32).reshape(-1))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".wav")
    os.close(fd)
    try:
        sf.write(tmp, audio, sample_rate, format=(path.suffix[1:] or "wav").upper() if path.suffix else "WAV")
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
    if path.suffix and path.suffix[1:].upper() not in sf.available_formats():
        raise AudioError(f"{path}: unknown audio format {path.suffix}; use .wav or .flac")
