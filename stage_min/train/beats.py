"""Beats and downbeats: the one beat tracker of training data (songs without beats.txt) and evaluation.

Two trackers:
- "librosa" (default, offline): librosa's dynamic-programming beat tracker (Ellis 2007) with the
  settings evaluation tuned on click tracks (256-sample hop, untrimmed, a silent tail; see
  `beat_times`). It gives no downbeats, so the bar phase is chosen by a rule: in 4/4, of the four
  ways to take every 4th beat, the one whose beats are followed by the most low-frequency energy
  (the kick and the bass tend to open a bar). How often this is right on synthetic songs, whose
  downbeats are known: `python -m stage_min.train.beat_check DATA` (docs/training.md).
- "beat_this": the Beat This! tracker (Foscarin et al., ISMIR 2024), which the original STAGE's
  `beatthis.npz` files suggest it used: beats and downbeats from one network. An optional extra
  (`pip install beat-this`); its checkpoint is downloaded on first use, so it needs the network once.
"""

import numpy as np
import soxr


TRACKERS = ("librosa", "beat_this")
TRACK_RATE = 22050  # librosa's beat tracker works at this rate...
TRACK_HOP = 256  # ...with 11.6 ms frames: 512 lags clicks by ~25 ms and halves the tempo at 179 BPM
TRACK_TAIL = 0.5  # seconds of silence appended before tracking
BEATS_PER_BAR = 4
LOW_HZ = 150.0  # "low frequency": the mel bands up to here (kick drum, bass)
# in data.py's cache key of songs with tracked beats: a change of settings re-tracks them
TRACKER_ID = f"librosa-{TRACK_RATE}-hop{TRACK_HOP}-tail{TRACK_TAIL}-untrimmed-phase{LOW_HZ:g}"
_beat_this = {}  # device -> loaded model: loaded once per process


def check_tracker(name: str):
    """Raise ValueError (one line) when the tracker is unknown or cannot be imported."""
    if name not in TRACKERS:
        raise ValueError(f"--beat-tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    if name == "beat_this":
        try:
            import beat_this.inference  # noqa: F401
        except ImportError:
            raise ValueError("--beat-tracker beat_this needs the beat-this package (pip install beat-this; its "
                             "checkpoint is downloaded on first use, so the first run needs the network)") from None


def downbeat_phase(y: np.ndarray, sr: int, beats: np.ndarray, beats_per_bar: int = BEATS_PER_BAR) -> int:
    """Index of the first downbeat among `beats` (seconds): the phase p whose beats p, p + 4, ...
    are followed by the most low-frequency energy (mel bands up to 150 Hz, in dB, averaged over the
    100 ms after each beat: the kick drum and the bass note that open a bar). Onset strength (flux)
    in the same bands was tried first and found the phase in only about 60 % of synthetic songs:
    the snare's noise has low-frequency flux too, while the energy that follows a beat tells the kick."""
    import librosa

    if len(beats) == 0:
        return 0
    hop = 256
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=2048, hop_length=hop, fmax=LOW_HZ, n_mels=16)
    energy = librosa.power_to_db(mel.sum(0))
    frames = librosa.time_to_frames(beats, sr=sr, hop_length=hop)
    span = max(1, int(round(0.1 * sr / hop)))
    after = np.array([energy[f:f + span].mean() if f < len(energy) else energy.min() for f in frames])
    scores = [after[p::beats_per_bar].mean() if len(after[p::beats_per_bar]) else -np.inf for p in range(beats_per_bar)]
    return int(np.argmax(scores))


def _librosa_beats(y: np.ndarray) -> np.ndarray:
    """Beat times (s) of mono audio at TRACK_RATE: untrimmed (the first beat of a short clip is often
    weak, and trimming drops it), over the audio followed by TRACK_TAIL of silence (without it the
    tracker puts a beat on the last frame), beats in that tail dropped."""
    import librosa  # slow to import: only when beats are tracked

    padded = np.pad(y, (0, int(TRACK_TAIL * TRACK_RATE)))
    _, beats = librosa.beat.beat_track(y=padded, sr=TRACK_RATE, hop_length=TRACK_HOP, trim=False, units="time")
    beats = np.asarray(beats, dtype=np.float64)
    return beats[beats < len(y) / TRACK_RATE]


def _beat_this_model(device: str | None):
    """Beat This! (final0 checkpoint, no DBN, as its authors advise), loaded once per device."""
    check_tracker("beat_this")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in _beat_this:
        from beat_this.inference import Audio2Beats

        try:
            _beat_this[device] = Audio2Beats(checkpoint_path="final0", device=device, dbn=False)
        except Exception as e:  # its weights are downloaded on first use
            raise ValueError(f"beat_this could not load its weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _beat_this[device]


def beat_times(audio: np.ndarray, sample_rate: int, tracker: str = "librosa", device: str | None = None) -> np.ndarray:
    """Beat times (s) of mono audio, without downbeats (evaluation's use)."""
    check_tracker(tracker)
    audio = np.asarray(audio, dtype=np.float32)
    if tracker == "beat_this":
        beats, _ = _beat_this_model(device)(audio, sample_rate)
        return np.asarray(beats, dtype=np.float64)
    return _librosa_beats(soxr.resample(audio, sample_rate, TRACK_RATE).astype(np.float32))


def track_librosa(mixture: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(beat times (N,) s, downbeat flags (N,)) with librosa's beat tracker and the phase rule."""
    y = soxr.resample(np.asarray(mixture, dtype=np.float32), sample_rate, TRACK_RATE).astype(np.float32)
    beats = _librosa_beats(y)
    phase = downbeat_phase(y, TRACK_RATE, beats)
    return beats, (np.arange(len(beats)) - phase) % BEATS_PER_BAR == 0


def track_beat_this(mixture: np.ndarray, sample_rate: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(beat times, downbeat flags) from Beat This!."""
    beats, downbeats = _beat_this_model(device)(np.asarray(mixture, dtype=np.float32), sample_rate)
    beats = np.asarray(beats, dtype=np.float64)
    down = np.zeros(len(beats), dtype=bool)
    if len(beats) and len(downbeats):  # Beat This! reports downbeats among its beats: flag the nearest beat of each
        down[np.abs(beats[None, :] - np.asarray(downbeats, dtype=np.float64)[:, None]).argmin(-1)] = True
    return beats, down


def track(name: str, mixture: np.ndarray, sample_rate: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(beat times, downbeat flags) of a mixture with the named tracker."""
    check_tracker(name)
    return track_beat_this(mixture, sample_rate, device) if name == "beat_this" else track_librosa(mixture, sample_rate)


# ---- measuring the phase rule on songs with annotated downbeats ----------------------------------
def phase_accuracy(songs: list[tuple[np.ndarray, int, np.ndarray, np.ndarray]], tolerance: float = 0.07) -> dict:
    """songs: (mixture, sample rate, annotated beat times, annotated downbeat flags). Returns the
    fraction of songs whose bar phase is right: `rule` with the annotated beat times (the rule alone),
    `tracked` with librosa's beats (tracked downbeats matched to annotated beats within 70 ms; right
    when most matched tracked downbeats are annotated downbeats and at least one matched)."""
    rule = tracked = 0
    for mix, sr, times, down in songs:
        y = soxr.resample(mix, sr, TRACK_RATE).astype(np.float32)
        rule += downbeat_phase(y, TRACK_RATE, times) == int(np.argmax(down))
        beats, flags = track_librosa(mix, sr)
        hits = []
        for t in beats[flags]:
            i = int(np.abs(times - t).argmin())
            if abs(times[i] - t) <= tolerance:
                hits.append(bool(down[i]))
        tracked += bool(hits) and np.mean(hits) > 0.5
    n = max(1, len(songs))
    return {"songs": len(songs), "rule": rule / n, "tracked": tracked / n}
