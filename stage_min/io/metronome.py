"""Click tracks: the context for tempo-constrained generation, and STAGE's metronome training pairs.

Made exactly as the original STAGE code makes them (docs/original.md#data), so that an official checkpoint
hears at inference the clicks it heard in training: `librosa.clicks` at 1 kHz with librosa's default
click (0.1 s, decaying), a second click added on each downbeat, the sum clipped to [-1, 1]. A downbeat
is therefore the same pitch, louder (and clipped).

`clicks` writes librosa.clicks' few lines of numpy again, sample for sample (tests/test_metronome.py
compares them): importing librosa takes 2 s (numba, scipy.signal), most of what `sample.py --bpm`
would otherwise spend before generating.
"""
import numpy as np

SAMPLE_RATE = 32000
CLICK_FREQ = 1000.0  # the original's click_freq
CLICK_SECONDS = 0.1  # librosa's default click duration, which the original keeps


def clicks(times: np.ndarray, n: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """librosa.clicks(times=times, sr=sample_rate, click_freq=CLICK_FREQ, length=n): a 1 kHz sine whose
    level halves ten times over 0.1 s, added at each time (floored to a sample), cut at n samples."""
    click = np.logspace(0, -10, num=int(sample_rate * CLICK_SECONDS), base=2.0)
    click *= np.sin(2 * np.pi * CLICK_FREQ / float(sample_rate) * np.arange(len(click)))
    out = np.zeros(n, dtype=np.float32)  # float32 sums, as librosa's
    for start in (np.asarray(times) * sample_rate).astype(int):
        if start < n:
            out[start:start + len(click)] += click[:n - start]
    return out


def beat_times(bpm: float, duration: float, offset: float = 0.0) -> np.ndarray:
    """Beat times in seconds: offset, offset + 60/bpm, ... up to (not including) duration."""
    if not (bpm > 0 and np.isfinite(bpm)):
        raise ValueError(f"BPM must be a finite number > 0, got {bpm}")
    if not (offset >= 0 and np.isfinite(offset)):
        raise ValueError(f"offset must be a finite number >= 0, got {offset}")
    period = 60.0 / bpm
    return offset + period * np.arange(max(0, int(np.ceil((duration - offset) / period))))


def click_track(beats: np.ndarray, duration: float, beats_per_bar: int = 4, first_downbeat: int = 0,
                sample_rate: int = SAMPLE_RATE, downbeats: np.ndarray | None = None) -> np.ndarray:
    """Clicks at the given beat times (seconds). Beat i is a downbeat when (i - first_downbeat) is a
    multiple of beats_per_bar, unless an explicit boolean `downbeats` array is given."""
    if beats_per_bar < 1:
        raise ValueError(f"beats per bar must be >= 1, got {beats_per_bar}")
    if not (duration > 0 and np.isfinite(duration)):
        raise ValueError(f"duration must be a finite number > 0, got {duration}")
    beats = np.asarray(beats, dtype=np.float64)
    n = int(round(duration * sample_rate))
    if downbeats is None:
        downbeats = (np.arange(len(beats)) - first_downbeat) % beats_per_bar == 0
    downbeats = np.asarray(downbeats, dtype=bool)
    out = np.zeros(n, dtype=np.float64)
    for times in (beats, beats[downbeats]):  # every beat, then the downbeats once more on top
        inside = times[(times >= 0) & (times * sample_rate < n)]
        if len(inside):
            out += clicks(inside, n, sample_rate)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def metronome(bpm: float, duration: float, beats_per_bar: int = 4, offset: float = 0.0,
              sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A steady click track: `duration` seconds at `bpm`, first click (a downbeat) at `offset` s."""
    return click_track(beat_times(bpm, duration, offset), duration, beats_per_bar, 0, sample_rate)
