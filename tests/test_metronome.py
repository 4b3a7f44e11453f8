"""Click tracks: our clicks are librosa.clicks sample for sample (the original STAGE's click tracks)."""
import librosa
import numpy as np
import pytest

from stage_min.io.metronome import CLICK_FREQ, SAMPLE_RATE, beat_times, click_track, clicks, metronome


@pytest.mark.parametrize("sample_rate", [SAMPLE_RATE, 22050])
def test_clicks_are_librosas(sample_rate):
    rng = np.random.default_rng(0)
    n = 3 * sample_rate
    times = np.sort(rng.uniform(0, 3.2, 40))  # some past the end, some overlapping, one near the end
    times = times[times * sample_rate < n]
    ours = clicks(times, n, sample_rate)
    theirs = librosa.clicks(times=times, sr=sample_rate, click_freq=CLICK_FREQ, length=n)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_metronome_downbeats_are_louder():
    track = metronome(bpm=120, duration=4.0, beats_per_bar=4)
    beats = beat_times(120, 4.0)
    rms = [np.sqrt(np.mean(track[int(t * SAMPLE_RATE):int(t * SAMPLE_RATE) + 3200] ** 2)) for t in beats]
    assert len(beats) == 8 and rms[0] > 1.3 * rms[1] and rms[4] > 1.3 * rms[5]  # twice the click, clipped
    assert np.abs(track).max() <= 1.0
    assert np.array_equal(track, click_track(beats, 4.0, 4))
