"""Click tracks: the context for tempo-constrained generation, and STAGE's metronome training pairs.

A click is a short decaying sine burst placed sample-accurately at each beat; downbeats (the first
beat of each bar) are higher and louder, as in STAGE's metronome contexts.
"""
import numpy as np

SAMPLE_RATE = 32000
CLICK_SECONDS = 0.03


def _click(freq: float, amplitude: float, sample_rate: int) -> np.ndarray:
    t = np.arange(int(CLICK_SECONDS * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t) * np.exp(-t / (CLICK_SECONDS / 5))).astype(np.float32)


def beat_times(bpm: float, duration: float, offset: float = 0.0) -> np.ndarray:
    """Beat times in seconds: offset, offset + 60/bpm, ... up to (not including) duration."""
    if not bpm > 0:
        raise ValueError(f"BPM must be > 0, got {bpm}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    period = 60.0 / bpm
    return offset + period * np.arange(max(0, int(np.ceil((duration - offset) / period))))


def click_track(beats: np.ndarray, duration: float, beats_per_bar: int = 4, first_downbeat: int = 0,
                sample_rate: int = SAMPLE_RATE, downbeats: np.ndarray | None = None) -> np.ndarray:
    """Clicks at the given beat times (seconds). Beat i is a downbeat when (i - first_downbeat) is a
    multiple of beats_per_bar, unless an explicit boolean `downbeats` array is given."""
    if beats_per_bar < 1:
        raise ValueError(f"beats per bar must be >= 1, got {beats_per_bar}")
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    out = np.zeros(int(round(duration * sample_rate)), dtype=np.float32)
    strong, weak = _click(1500.0, 0.9, sample_rate), _click(1000.0, 0.5, sample_rate)
    for i, t in enumerate(np.asarray(beats, dtype=np.float64)):
        start = int(round(t * sample_rate))
        if start < 0 or start >= len(out):
            continue
        is_down = downbeats[i] if downbeats is not None else (i - first_downbeat) % beats_per_bar == 0
        click = strong if is_down else weak
        end = min(len(out), start + len(click))
        out[start:end] += click[: end - start]
    return out


def metronome(bpm: float, duration: float, beats_per_bar: int = 4, offset: float = 0.0,
              sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A steady click track: `duration` seconds at `bpm`, first click (a downbeat) at `offset` s."""
    return click_track(beat_times(bpm, duration, offset), duration, beats_per_bar, 0, sample_rate)
