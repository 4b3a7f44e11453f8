"""How far pedalboard's Rubber Band (augment.py, with the original's settings) is from the original's own
pylibrb call, on synthetic song windows:

    python -m stage_min.train.augment_check

Its own module: it draws songs from the toy's synthesiser, which the training data code must not import.
"""
import numpy as np

from ..toy import synth
from .augment import Augmentation, apply


def compare_engines(n_songs: int = 6, seconds: float = 10.0, seed: int = 0, sample_rate: int = 32000, **pedalboard_kw) -> dict:
    """pedalboard against the original's pylibrb call on synthetic drum and bass windows, each with
    a random ratio (0.01 steps in [0.8, 1.2]) and shift ([-4, 4]): medians of the waveform
    correlation and SNR, of the onset-envelope correlation, and the mean log-mel difference (nats)."""
    import librosa
    import pedalboard

    def logmel(x):
        return np.log(librosa.feature.melspectrogram(y=x, sr=sample_rate, n_fft=2048, hop_length=512, n_mels=64) + 1e-6)

    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    rows = []
    for _ in range(n_songs):
        song = synth.make_song(rng, seconds)
        for stem in ("drums", "bass"):
            ratio, semis = float(np.round(rng.uniform(0.8, 1.2), 2)), int(rng.integers(-4, 5))
            src = song[stem].astype(np.float32)[:int(np.ceil(n / ratio))]
            o = apply(src, sample_rate, Augmentation(ratio, semis), n, engine="pylibrb")
            kw = {"high_quality": False, "preserve_formants": False, **pedalboard_kw}
            p = pedalboard.time_stretch(src[None], sample_rate, stretch_factor=1.0 / ratio, pitch_shift_in_semitones=float(semis), **kw)[0]
            p = apply(p, sample_rate, Augmentation(), n)
            eo, ep = librosa.onset.onset_strength(y=o, sr=sample_rate), librosa.onset.onset_strength(y=p, sr=sample_rate)
            rows.append((np.corrcoef(o, p)[0, 1], 10 * np.log10(np.sum(o ** 2) / max(np.sum((o - p) ** 2), 1e-20)),
                         np.corrcoef(eo, ep)[0, 1], np.mean(np.abs(logmel(o) - logmel(p)))))
    a = np.array(rows)
    return {"windows": len(rows), "waveform_corr": float(np.median(a[:, 0])), "snr_db": float(np.median(a[:, 1])),
            "onset_env_corr": float(np.median(a[:, 2])), "logmel_diff": float(a[:, 3].mean())}


if __name__ == "__main__":  # python -m stage_min.train.augment_check: the measurement in the module docstring
    for label, kw in (("pedalboard as set here", {}), ("pedalboard, formants preserved", {"preserve_formants": True})):
        print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in compare_engines(**kw).items()})
