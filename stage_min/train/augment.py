"""Training augmentation as the original STAGE does it (REFERENCE.md section 8.8): a speed change
(p 0.5, time ratio in [0.8, 1.2]) and a pitch shift (p 0.5, whole semitones in [-4, 4]) applied to
the whole window, target and context alike, with Rubber Band (pedalboard bundles it) rather than a
hand-written stretcher.

The ratio is Rubber Band's time ratio, as in the original: output duration / input duration. A
window of T seconds with ratio r is made from T / r seconds of the song (r < 1: faster, more of the
song in the window), and a beat at t seconds into that segment lands at t * r.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    ratio: float = 1.0  # time ratio (output / input duration)
    semitones: int = 0

    @property
    def identity(self) -> bool:
        return self.ratio == 1.0 and self.semitones == 0


def draw(rng: np.random.Generator, p_speed: float, speed_min: float, speed_max: float, p_pitch: float,
         max_semitones: int) -> Augmentation:
    """Two coin tosses, then the factors (always four draws, so that later draws do not depend on the outcome)."""
    speed, ratio, pitch, semitones = rng.random(), rng.uniform(speed_min, speed_max), rng.random(), rng.integers(-max_semitones, max_semitones + 1)
    return Augmentation(float(ratio) if speed < p_speed else 1.0, int(semitones) if pitch < p_pitch else 0)


def apply(audio: np.ndarray, sample_rate: int, aug: Augmentation, n_out: int) -> np.ndarray:
    """Stretch and pitch-shift mono audio, then cut or zero-pad to exactly n_out samples."""
    if not aug.identity:
        import pedalboard  # imported here: only training with augmentation needs it

        # pedalboard's stretch_factor is a speed (2 = twice as fast); high_quality=False is Rubber
        # Band's faster engine, the one the original asked for (ENGINE_FASTER)
        audio = pedalboard.time_stretch(audio[None].astype(np.float32), sample_rate, stretch_factor=1.0 / aug.ratio,
                                        pitch_shift_in_semitones=float(aug.semitones), high_quality=False)[0]
    out = np.zeros(n_out, dtype=np.float32)
    n = min(n_out, len(audio))
    out[:n] = audio[:n]
    return out
