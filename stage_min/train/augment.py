"""Training augmentation as the original STAGE does it (docs/original.md#augmentation): a speed
change (p 0.5, time ratio in [0.8, 1.2] rounded to 0.01) and a pitch shift (p 0.5, whole semitones
in [-4, 4]) applied to the whole window, target and context alike, with Rubber Band.

The ratio is Rubber Band's time ratio, as in the original: output duration / input duration. A
window of T seconds with ratio r is made from T / r seconds of the song (r < 1: faster, more of the
song in the window), and a beat at t seconds into that segment lands at t * r.

Two engines (both Rubber Band):
- "pedalboard" (default; a core dependency): `pedalboard.time_stretch` set as close to the
  original's options as it allows: offline, `high_quality=False` (R2, the faster engine),
  `preserve_formants=False`, and its defaults for the rest (crisp transients, compound detector,
  laminar phase, standard window, no smoothing), which are Rubber Band's defaults too. Its output
  has the original's length and timing but not its samples (its own Rubber Band build and way of
  feeding it): on 12 synthetic 10 s drum and bass windows, waveform correlation with the
  original's 0.59 (median), SNR 0.9 dB, onset-envelope correlation 0.97, log-mel difference 0.17 nats
  (0.27 with formants preserved, this code's earlier setting): `python -m stage_min.train.augment_check`.
- "pylibrb" (`pip install pylibrb`, the `parity` extra): the original's own call, options
  `PROCESS_OFFLINE | ENGINE_FASTER` and nothing else, for sample-exact parity with its data.
The original falls back to the unstretched audio when Rubber Band takes over 2 s; here it never
times out (a window takes 0.2-0.5 s).
"""
from dataclasses import dataclass

import numpy as np

ENGINES = ("pedalboard", "pylibrb")


@dataclass(frozen=True)
class Augmentation:
    ratio: float = 1.0  # time ratio (output / input duration)
    semitones: int = 0

    @property
    def identity(self) -> bool:
        return self.ratio == 1.0 and self.semitones == 0


def draw(rng: np.random.Generator, p_speed: float, speed_min: float, speed_max: float, p_pitch: float,
         max_semitones: int, decimals: int | None = 2) -> Augmentation:
    """Two coin tosses, then the factors (always four draws, so that later draws do not depend on the
    outcome). The ratio is rounded to `decimals` places (2: the original's 0.01 steps; None: not rounded)."""
    speed, ratio, pitch, semitones = rng.random(), rng.uniform(speed_min, speed_max), rng.random(), rng.integers(-max_semitones, max_semitones + 1)
    if decimals is not None:
        ratio = min(max(round(float(ratio), decimals), speed_min), speed_max)
    return Augmentation(float(ratio) if speed < p_speed else 1.0, int(semitones) if pitch < p_pitch else 0)


def stretch_pylibrb(audio: np.ndarray, sample_rate: int, ratio: float, semitones: int) -> np.ndarray:
    """The original's call: one offline pass (study, then process) with only PROCESS_OFFLINE | ENGINE_FASTER."""
    try:
        import pylibrb
    except ImportError:
        raise ValueError("the pylibrb augmentation engine needs `pip install pylibrb` (the parity extra)") from None
    st = pylibrb.RubberBandStretcher(sample_rate=sample_rate, channels=1,
                                     options=pylibrb.Option.PROCESS_OFFLINE | pylibrb.Option.ENGINE_FASTER,
                                     initial_time_ratio=ratio, initial_pitch_scale=pow(2, semitones / 12))
    st.set_max_process_size(audio.shape[-1])
    block = audio.astype(np.float32).reshape(1, -1)
    st.study(block, final=True)
    st.process(block, final=True)
    return st.retrieve_available().reshape(-1).astype(np.float32)


def stretch_pedalboard(audio: np.ndarray, sample_rate: int, ratio: float, semitones: int) -> np.ndarray:
    import pedalboard  # imported here: only training with augmentation needs it

    # pedalboard's stretch_factor is a speed (2 = twice as fast); high_quality=False is Rubber Band's
    # faster (R2) engine and preserve_formants=False the formant setting the original runs with
    return pedalboard.time_stretch(audio[None].astype(np.float32), sample_rate, stretch_factor=1.0 / ratio,
                                   pitch_shift_in_semitones=float(semitones), high_quality=False, preserve_formants=False)[0]


def apply(audio: np.ndarray, sample_rate: int, aug: Augmentation, n_out: int, engine: str = "pedalboard") -> np.ndarray:
    """Stretch and pitch-shift mono audio, then cut or zero-pad to exactly n_out samples."""
    if not aug.identity:
        stretch = stretch_pylibrb if engine == "pylibrb" else stretch_pedalboard
        audio = stretch(audio, sample_rate, aug.ratio, aug.semitones)
    out = np.zeros(n_out, dtype=np.float32)
    n = min(n_out, len(audio))
    out[:n] = audio[:n]
    return out
