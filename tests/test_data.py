"""The stems dataset: layouts, windows and contexts, metronome pairs, beats, the code cache, bad files."""
import numpy as np
import pytest
import soundfile as sf
import torch

from stage_min.train import data as D
from stage_min.io.metronome import click_track

SR, HOP = 32000, 640


class FakeCodec(torch.nn.Module):
    """A codec stand-in whose codes are a readable function of the audio: the frame's mean |x|."""

    def __init__(self, scale=1000):
        super().__init__()
        self.sample_rate, self.hop, self.frame_rate, self.bandwidth = SR, HOP, SR / HOP, 2.2
        self.n_codebooks, self.card = 4, 2048
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)), requires_grad=False)
        self.calls = 0

    def encode(self, audio):
        self.calls += 1
        B, _, N = audio.shape
        T = -(-N // HOP)
        x = torch.nn.functional.pad(audio[:, 0], (0, T * HOP - N)).view(B, T, HOP).abs().mean(-1)
        codes = (x * self.scale).long().clamp(0, 2047)
        return torch.stack([codes, codes // 2, codes // 4, codes // 8], dim=1)


def tone(seconds, freq=220.0, amp=0.5, start=0.0, stop=None):
    t = np.arange(int(seconds * SR)) / SR
    x = amp * np.sin(2 * np.pi * freq * t)
    x[(t < start) | (t >= (stop if stop is not None else seconds))] = 0
    return x.astype(np.float32)


def write_song(folder, stems: dict, beats=None, caption=None):
    folder.mkdir(parents=True)
    for name, audio in stems.items():
        path = folder / f"{name}.wav"
        if "/" in name:
            path.parent.mkdir(exist_ok=True)
        sf.write(path, audio, SR, subtype="FLOAT")
    if beats is not None:
        (folder / "beats.txt").write_text("".join(f"{t} {p}\n" for t, p in beats))
    if caption is not None:
        (folder / "caption.txt").write_text(caption)


def prepare(root, cfg, codec=None, cache=None, stats=None):
    codec = codec or FakeCodec()
    stats = stats or D.Stats()
    cache = cache or root / ".cache"
    out = [D.prepare_song(s, cfg, codec, "cpu", cache, stats) for s in D.find_songs(root)]
    return [s for s in out if s is not None], stats, codec


BEATS = [(0.5 * i, i % 4 + 1) for i in range(12)]  # 120 BPM, 4/4, first beat a downbeat


@pytest.fixture
def dataset(tmp_path):
    """One plain-layout song: drums only in 2..6 s, bass silent, chords and vocals everywhere."""
    write_song(tmp_path / "songA", {
        "drums": tone(6, 100, start=2.0), "bass": tone(6, 55, amp=0.001), "chords": tone(6, 330, amp=0.3),
        "vocals": tone(6, 440, amp=0.4),
    }, beats=BEATS, caption="a test song")
    return tmp_path


def test_layouts_plain_and_moisesdb(tmp_path):
    write_song(tmp_path / "plain", {"drums": tone(2), "bass": tone(2), "mixture": tone(2)})
    a, b = tone(2, 100, amp=0.2), tone(2, 150, amp=0.3)
    write_song(tmp_path / "moises", {"drums/0c1d": a, "drums/9f2e": b, "bass/77aa": tone(2, 55)})
    songs = {s.name: s for s in D.find_songs(tmp_path)}
    assert set(songs) == {"plain", "moises"}
    assert set(songs["plain"].stems) == {"drums", "bass"}  # the mixture is not a stem
    assert set(songs["moises"].stems) == {"drums", "bass"}
    assert len(songs["moises"].stems["drums"]) == 2
    summed = D.load_stem(songs["moises"].stems["drums"], SR)
    np.testing.assert_allclose(summed, a + b, atol=1e-6)  # all drum tracks summed into one stem
    nested = tmp_path / "outer"  # one level deeper works too (moisesdb/moisesdb_v0.1/<song>)
    (nested / "v0.1").mkdir(parents=True)
    (tmp_path / "plain").rename(nested / "v0.1" / "plain")
    assert [s.name for s in D.find_songs(nested)] == ["plain"]


def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.find_songs(tmp_path / "nope")
    with pytest.raises(D.DataError, match="no songs"):
        D.find_songs(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(D.DataError, match="is a file"):
        D.find_songs(tmp_path / "notes.txt")


def plain(**kw):
    """A DataConfig for the tone songs: any stem but vocals in a context, no augmentation."""
    return D.DataConfig(**{"target": "drums", "context_stems": None, "exclude": ("vocals",), "augment": False, **kw})


def test_windows_and_contexts(dataset):
    cfg = plain(target_seconds=1.0, context_min=0.5, context_max=1.0, context_step=0.25, p_metronome=0.0)
    songs, stats, codec = prepare(dataset, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    assert w.n_target == 50 and w.context_lengths == [25, 38, 50]
    sd = songs[0]
    seen = set()
    for i in range(60):
        ex = w.draw(np.random.default_rng(i))
        assert ex.target.shape == (50 * HOP,)  # the window's target audio, encoded by the training loop
        np.testing.assert_allclose(ex.target, D.read_segment(sd.song.stems["drums"], ex.start / 50, 1.0, SR))
        assert sd.peaks["drums"][ex.start:ex.start + 50].max() >= cfg.silence  # never a silent target
        assert ex.start + 50 > 2.0 * 50  # the target is silent before 2 s
        assert ex.context_stems == ["chords"]  # not the target, not vocals (excluded), not the silent bass
        n = len(ex.context)
        assert n % HOP == 0 and n // HOP in w.context_lengths
        t0 = ex.start / 50
        expected = D.read_segment(sd.song.stems["chords"], t0, n / SR, SR)
        np.testing.assert_allclose(ex.context, expected)
        assert ex.caption == "a test song" and not ex.metronome
        seen.add(n // HOP)
    assert len(seen) == 3  # every context length is drawn
    # the same generator state gives the same example (what makes resume and DDP exact)
    a, b = w.draw(np.random.default_rng([1, 2, 3])), w.draw(np.random.default_rng([1, 2, 3]))
    assert a.start == b.start and np.array_equal(a.context, b.context)


def test_context_is_a_random_nonempty_subset(tmp_path):
    write_song(tmp_path / "s", {"drums": tone(4, 100), "bass": tone(4, 55), "chords": tone(4, 330), "keys": tone(4, 600),
                                "vocals": tone(4, 440)})
    cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=0.0)
    songs, stats, codec = prepare(tmp_path, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    subsets = {tuple(w.draw(np.random.default_rng(i)).context_stems) for i in range(200)}
    assert all(s and "vocals" not in s and "drums" not in s for s in subsets)
    assert len(subsets) == 7  # all non-empty subsets of {bass, chords, keys}
    cfg.exclude = ()  # vocals can be allowed
    assert any("vocals" in w.draw(np.random.default_rng(i)).context_stems for i in range(100))


def test_metronome_pairs(dataset):
    cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=1.0)
    songs, stats, codec = prepare(dataset, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    for i in range(10):
        ex = w.draw(np.random.default_rng(i))
        assert ex.metronome and ex.context_stems == []
        t0 = ex.start / 50
        times = np.array([t for t, _ in BEATS])
        inside = (times >= t0) & (times < t0 + 1.0)
        down = np.array([p == 1 for _, p in BEATS])[inside]
        expected = click_track(times[inside] - t0, 1.0, sample_rate=SR, downbeats=down)
        np.testing.assert_array_equal(ex.context, expected)
        assert np.abs(ex.context).max() > 0.4
    cfg.p_metronome = 0.5
    n = sum(w.draw(np.random.default_rng(i)).metronome for i in range(200))
    assert 70 <= n <= 130  # binomial(200, 0.5): far outside this only if p is not used
    cfg.p_metronome = 0.0
    assert not any(w.draw(np.random.default_rng(i)).metronome for i in range(50))


def test_copy_contexts_are_the_target_and_only_where_asked(dataset):
    cfg = plain(target_seconds=1.0, context_min=0.5, context_max=0.5, p_full_context=0.0, p_metronome=0.5, p_copy_context=1.0)
    songs, stats, codec = prepare(dataset, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    for i in range(10):
        ex = w.draw(np.random.default_rng(i))
        assert not ex.metronome and ex.context_stems == ["drums"]
        np.testing.assert_array_equal(ex.context, ex.target[: len(ex.context)])  # the target's own first half
    cfg.p_copy_context = 0.3
    n = sum(w.draw(np.random.default_rng(i)).context_stems == ["drums"] for i in range(200))
    assert 35 <= n <= 85  # binomial(200, 0.3)
    with pytest.raises(ValueError, match="p-copy-context"):
        D.DataConfig(p_copy_context=1.5).check()


def test_beats_file_format():
    t, d = D.parse_beats("# comment\n0.5 1\n1.0 2\n1.5 3\n2.0 4\n2.5 1\n")
    np.testing.assert_allclose(t, [0.5, 1.0, 1.5, 2.0, 2.5])
    assert d.tolist() == [True, False, False, False, True]
    t2, d2 = D.parse_beats(D.format_beats(t, [1, 2, 3, 4, 1]))
    np.testing.assert_allclose(t2, t)
    assert d2.tolist() == d.tolist()
    _, d3 = D.parse_beats("0.1\n0.6\n1.1\n1.6\n2.1\n")  # no positions: every 4th beat from the first
    assert d3.tolist() == [True, False, False, False, True]
    for bad in ("abc\n", "1.0 1\n0.5 2\n", "-1\n"):
        with pytest.raises(ValueError):
            D.parse_beats(bad)


def test_beat_tracker_runs_once_and_is_cached(tmp_path, monkeypatch):
    write_song(tmp_path / "s", {"drums": tone(3, 100), "bass": tone(3, 55)})  # no beats.txt
    calls = []

    def fake_tracker(mix, sr, tracker, device):
        calls.append(len(mix))
        return np.array([0.25, 0.75, 1.25]), np.array([False, True, False])

    monkeypatch.setattr(D, "track_beats", fake_tracker)
    cfg = D.DataConfig(target="drums", target_seconds=1.0, context_min=1.0, context_max=1.0)
    songs, _, _ = prepare(tmp_path, cfg)
    np.testing.assert_allclose(songs[0].beats, [0.25, 0.75, 1.25])
    assert songs[0].downbeats.tolist() == [False, True, False]
    assert calls == [3 * SR]  # on the full mixture
    songs, _, _ = prepare(tmp_path, cfg)
    assert len(calls) == 1 and len(songs[0].beats) == 3


def test_librosa_beat_tracker_finds_a_steady_tempo():
    from stage_min.io.metronome import metronome

    beats, down = D.track_beats(metronome(120, 8.0), SR)
    assert len(beats) >= 10 and down.sum() == len(range(0, len(beats) - int(np.argmax(down)), 4))
    assert abs(np.median(np.diff(beats)) - 0.5) < 0.03


def test_song_cache_reused_and_invalidated(dataset, monkeypatch):
    cfg = D.DataConfig(target="drums", target_seconds=1.0, context_min=1.0, context_max=1.0)
    reads = []
    real = D.load_stem
    monkeypatch.setattr(D, "load_stem", lambda files, sr: reads.append(files) or real(files, sr))
    songs, _, codec = prepare(dataset, cfg)
    assert len(reads) == 4 and codec.calls == 0  # every stem read once for its peaks; nothing encoded
    first = songs[0].peaks["drums"].copy()
    np.testing.assert_allclose(first[:100], 0, atol=1e-6)  # drums start at 2 s
    songs, _, _ = prepare(dataset, cfg, codec=codec)
    assert len(reads) == 4  # a cache hit: nothing read
    # another target reuses the same song summary
    songs, _, _ = prepare(dataset, D.DataConfig(target="bass", target_seconds=1.0, context_min=1.0, context_max=1.0))
    assert len(reads) == 4 and songs[0].target == "bass"
    # changed audio invalidates the entry
    sf.write(dataset / "songA" / "drums.wav", tone(6, 100, amp=0.9), SR, subtype="FLOAT")
    songs, _, _ = prepare(dataset, cfg, codec=codec)
    assert len(reads) == 8 and songs[0].peaks["drums"][0] > 0.5
    # a corrupt cache file is recomputed, not fatal
    for f in (dataset / ".cache").iterdir():
        f.write_bytes(b"garbage")
    songs, _, _ = prepare(dataset, cfg, codec=codec)
    assert len(reads) == 12 and len(songs) == 1


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    write_song(tmp_path / "good", {"drums": tone(3, 100), "bass": tone(3, 55)}, beats=BEATS)
    write_song(tmp_path / "bad_context", {"drums": tone(3, 100), "bass": tone(3, 55)}, beats=BEATS)
    (tmp_path / "bad_context" / "bass.wav").write_bytes(b"RIFF not really a wav")
    write_song(tmp_path / "bad_target", {"drums": tone(3, 100), "bass": tone(3, 55)})
    (tmp_path / "bad_target" / "drums.wav").write_bytes(b"\x00" * 100)
    write_song(tmp_path / "no_drums", {"bass": tone(3, 55)})
    write_song(tmp_path / "short", {"drums": tone(0.5, 100), "bass": tone(0.5, 55)}, beats=BEATS)
    (tmp_path / "good" / "beats.txt").write_text("not a number\n")
    cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=0.0)
    songs, stats, codec = prepare(tmp_path, cfg)
    assert sorted(s.song.name for s in songs) == ["bad_context", "good", "short"]
    assert stats.bad_files == 3  # two unreadable audio files and one unreadable beats.txt
    assert stats.no_target == 2
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "bad_context" in err and "bad_target" in err
    assert "bass" not in songs[[s.song.name for s in songs].index("bad_context")].peaks
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    assert stats.too_short == 1 and [s.song.name for s in w.songs] == ["bad_context", "good"]
    ex = w.draw(np.random.default_rng(0))
    assert ex.song == "good"  # the song whose only context stem is unreadable gives no mixture window
    # when nothing usable is left: a clear error
    with pytest.raises(D.DataError, match="no song"):
        D.StemWindows([], cfg, codec.frame_rate, SR, stats)


def test_split_is_deterministic_and_disjoint(tmp_path):
    for i in range(10):
        write_song(tmp_path / f"s{i}", {"drums": tone(0.1)})
    songs = D.find_songs(tmp_path)
    tr, va = D.split_songs(songs, 0.2, seed=0)
    tr2, va2 = D.split_songs(songs, 0.2, seed=0)
    assert [s.name for s in va] == [s.name for s in va2] and len(va) == 2 and len(tr) == 8
    assert not {s.name for s in tr} & {s.name for s in va}


def test_word_dropout_removes_words_at_the_given_rate():
    import numpy as np

    from stage_min.train.training import drop_words

    caption = " ".join(f"w{i}" for i in range(2000))
    kept = drop_words(caption, 0.3, np.random.default_rng(0)).split()
    assert 0.65 < len(kept) / 2000 < 0.75
    assert kept == [w for w in caption.split() if w in set(kept)]  # order kept, nothing invented
    assert drop_words(caption, 0.0, np.random.default_rng(0)) == caption
    assert drop_words(caption, 1.0, np.random.default_rng(0)) == ""


# ---- the original recipe (docs/original.md#data) ------------------------------------------------------
def test_default_context_stems_are_the_originals(tmp_path):
    write_song(tmp_path / "s", {name: tone(3, 100 + 50 * i) for i, name in enumerate(
        ["drums", "bass", "guitar", "vocals", "percussion", "wind", "other_plucked", "piano"])})
    cfg = D.DataConfig(target="drums", target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=0.0, augment=False)
    songs, stats, codec = prepare(tmp_path, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    used = {s for i in range(100) for s in w.draw(np.random.default_rng(i)).context_stems}
    assert used == {"bass", "guitar", "piano"}  # never vocals, percussion, wind, other_plucked, nor the target
    cfg.check_stem_names(D.find_songs(tmp_path))
    with pytest.raises(D.DataError, match="unknown stem 'gitar'"):
        D.DataConfig(context_stems=("bass", "gitar")).check_stem_names(D.find_songs(tmp_path))
    with pytest.raises(ValueError, match="speed"):
        D.DataConfig(speed_min=0.5, speed_max=4.5).check()
    with pytest.raises(ValueError, match="speed"):
        D.DataConfig(speed_min=0.0, speed_max=1.2).check()
    D.DataConfig(speed_min=0.25, speed_max=4.0).check()


def test_context_length_whole_window_or_uniform_prefix(dataset):
    cfg = plain(target_seconds=1.0, context_min=0.5, context_max=0.9, p_metronome=0.0)
    songs, stats, codec = prepare(dataset, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    lengths = [len(w.draw(np.random.default_rng(i)).context) // HOP for i in range(400)]
    full = sum(n == 50 for n in lengths)
    assert 5 <= full <= 40  # binomial(400, 0.05): the whole window now and then
    rest = [n for n in lengths if n != 50]
    assert min(rest) >= 25 and max(rest) <= 45 and len(set(rest)) >= 18  # every frame count, not a 0.5 s grid
    cfg.p_full_context, cfg.context_min, cfg.context_max = 0.0, 0.6, 0.6  # a fixed context length
    assert {len(w.draw(np.random.default_rng(i)).context) // HOP for i in range(50)} == {30}


def test_silence_is_judged_over_the_whole_window(tmp_path):
    # the bass is silent over the 1 s context prefix but not over the 2 s window: as in the original,
    # silence is judged over the window, so the bass is a context stem (here a silent one)
    write_song(tmp_path / "s", {"drums": tone(2, 100), "bass": tone(2, 55, start=1.5)})
    cfg = plain(target_seconds=2.0, context_min=1.0, context_max=1.0, p_full_context=0.0, p_metronome=0.0)
    songs, stats, codec = prepare(tmp_path, cfg)
    ex = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats).draw(np.random.default_rng(0))
    assert ex.context_stems == ["bass"] and np.abs(ex.context).max() == 0  # the prefix itself is silent


def test_augmentation_stretches_target_context_and_beats_alike(dataset):
    from stage_min.train import augment

    cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=0.0,
                augment=True, p_speed=1.0, speed_min=0.8, speed_max=0.8, p_pitch=1.0, pitch_semitones=2)
    songs, stats, codec = prepare(dataset, cfg)
    w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
    ex = w.draw(np.random.default_rng(0))
    assert ex.aug.ratio == 0.8 and -2 <= ex.aug.semitones <= 2
    sd, t0 = songs[0], ex.start / 50
    for audio, stems in ((ex.target, ["drums"]), (ex.context, ex.context_stems)):
        src = D.read_segment([f for s in stems for f in sd.song.stems[s]], t0, 1.0 / 0.8, SR)  # 1.25 s of song
        np.testing.assert_allclose(audio, augment.apply(src, SR, ex.aug, 50 * HOP)[:len(audio)], atol=1e-6)
    assert not np.allclose(ex.target, D.read_segment(sd.song.stems["drums"], t0, 1.0, SR), atol=1e-2)
    # metronome pairs: the clicks fall where the stretched beats fall (0.5 s apart in the song -> 0.4 s)
    cfg.p_metronome = 1.0
    ex = w.draw(np.random.default_rng(1))
    beats = (np.array([t for t, _ in BEATS]) - ex.start / 50) * 0.8
    inside = (beats >= 0) & (beats < 1.0)
    down = np.array([p == 1 for _, p in BEATS])[inside]
    np.testing.assert_array_equal(ex.context, click_track(beats[inside], 1.0, sample_rate=SR, downbeats=down))
    # pitch: a 220 Hz tone shifted by +4 semitones comes out near 277 Hz
    import librosa

    shifted = augment.apply(tone(1.0, 220.0), SR, augment.Augmentation(1.0, 4), SR)
    f0 = np.median(librosa.yin(shifted[SR // 4: 3 * SR // 4], fmin=100, fmax=600, sr=SR))
    assert abs(f0 - 220 * 2 ** (4 / 12)) < 5


def test_augmentation_draws_follow_the_probabilities():
    from stage_min.train import augment

    draws = [augment.draw(np.random.default_rng(i), 0.5, 0.8, 1.2, 0.5, 4) for i in range(400)]
    speed = [d.ratio for d in draws if d.ratio != 1.0]
    pitch = [d.semitones for d in draws if d.semitones != 0]
    assert 160 <= len(speed) <= 240 and min(speed) >= 0.8 and max(speed) <= 1.2
    assert 130 <= len(pitch) <= 220 and set(pitch) <= set(range(-4, 5))  # 0 is a possible draw too
    assert all(d == augment.Augmentation() for d in (augment.draw(np.random.default_rng(i), 0, 0.8, 1.2, 0, 4) for i in range(20)))


def test_librosa_downbeat_rule_on_synthetic_songs(tmp_path):
    """The bar phase chosen by the low-frequency rule matches the annotated downbeats (stage_min.toy.synth
    writes positions), with the annotated beat times and with librosa's own."""
    from stage_min.train import beats
    from stage_min.toy import synth

    rng = np.random.default_rng(5)
    songs = []
    for _ in range(6):
        song = synth.make_song(rng, 12.0)
        mix = song["drums"] + song["bass"] + song["chords"]
        times = np.array([t for t, _ in song["beats"]])
        songs.append((mix.astype(np.float32), 32000, times, np.array([p == 1 for _, p in song["beats"]])))
    r = beats.phase_accuracy(songs)
    assert r["rule"] >= 5 / 6 and r["tracked"] >= 4 / 6, r


def test_beat_this_is_optional_with_a_clear_error(monkeypatch):
    import sys

    from stage_min.train import beats

    monkeypatch.setitem(sys.modules, "beat_this", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install beat-this") as e:
        beats.check_tracker("beat_this")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="beat-tracker"):
        beats.check_tracker("madmom")

    class FakeAudio2Beats:  # Beat This!'s interface: (signal, sr) -> (beat times, downbeat times)
        def __init__(self, checkpoint_path, device, dbn):
            assert checkpoint_path == "final0" and not dbn

        def __call__(self, signal, sr):
            return np.array([0.5, 1.0, 1.5, 2.0, 2.5]), np.array([1.0, 3.0 - 1e-4 - 0.5])

    import types
    fake = types.ModuleType("beat_this.inference")
    fake.Audio2Beats = FakeAudio2Beats
    monkeypatch.setitem(sys.modules, "beat_this", types.ModuleType("beat_this"))
    monkeypatch.setitem(sys.modules, "beat_this.inference", fake)
    monkeypatch.setattr(beats, "_beat_this", {})
    t, down = D.track_beats(np.zeros(SR, np.float32), SR, "beat_this")
    assert t.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5] and down.tolist() == [False, True, False, False, True]


# ---- the original's captions, silence rule and window retries (docs/original.md#data) ------------
def test_original_captions_from_features_json(tmp_path):
    from stage_min.train.captions import original_caption

    assert original_caption({"genres": "Rock", "moods": "happy"}) == "Genre: Rock. Mood: happy. "
    assert original_caption({"genres": "Rock, Alternative Rock,Pop Rock,Indie", "moods": "energetic, happy"}) == \
        "Genres: Rock, Alternative Rock, Pop Rock. Moods: energetic, happy. "  # the first 3 only
    assert original_caption({"moods": "calm"}) == "Mood: calm. "
    assert original_caption({"genres": "", "moods": "calm"}) == "Genre: . Mood: calm. "  # the original's own output
    write_song(tmp_path / "labelled", {"drums": tone(1)})
    (tmp_path / "labelled" / "features.json").write_text('{"genres": "Funk,Soul", "moods": "groovy", "bpm": 100}')
    write_song(tmp_path / "both", {"drums": tone(1)}, caption="my own caption")
    (tmp_path / "both" / "features.json").write_text('{"genres": "Funk", "moods": "groovy"}')
    write_song(tmp_path / "broken", {"drums": tone(1)})
    (tmp_path / "broken" / "features.json").write_text("{not json")
    captions = {s.name: s.caption for s in D.find_songs(tmp_path)}
    assert captions == {"labelled": "Genres: Funk, Soul. Mood: groovy. ", "both": "my own caption", "broken": ""}


def test_silence_rule_is_the_signed_maximum_by_default(tmp_path):
    # a bass whose samples are all <= 0 (loud, but only negative half-waves): the original's signed
    # maximum calls it silent, the peak rule does not
    negative = -np.abs(tone(2, 55, amp=0.5))
    write_song(tmp_path / "s", {"drums": tone(2, 100), "bass": negative, "guitar": tone(2, 300, amp=0.3)})
    for rule, expected in (("max", {"guitar"}), ("peak", {"bass", "guitar"})):
        cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=0.0, silence_rule=rule)
        assert cfg.silence_rule == rule
        songs, stats, codec = prepare(tmp_path, cfg, cache=tmp_path / f".cache-{rule}")
        w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
        used = {s for i in range(40) for s in w.draw(np.random.default_rng(i)).context_stems}
        assert used == expected, rule
    assert D.DataConfig().silence_rule == "max"
    with pytest.raises(ValueError, match="silence-rule"):
        D.DataConfig(silence_rule="rms").check()


def test_window_retries_stay_in_the_song_until_two_stems_play(tmp_path):
    # drums all along, the bass only in 6..7 s of 8 s: the original retries start positions in the
    # same song until the target and one more stem play, click windows included
    write_song(tmp_path / "s", {"drums": tone(8, 100), "bass": tone(8, 55, start=6.0, stop=7.0)},
               beats=[(0.5 * i, i % 4 + 1) for i in range(16)])
    for p_metronome in (0.0, 1.0):
        cfg = plain(target_seconds=1.0, context_min=1.0, context_max=1.0, p_metronome=p_metronome)
        songs, stats, codec = prepare(tmp_path, cfg)
        w = D.StemWindows(songs, cfg, codec.frame_rate, SR, stats)
        starts = [w.draw(np.random.default_rng(i)).start for i in range(30)]
        assert all(250 < f < 350 for f in starts), (p_metronome, starts)  # the window overlaps 6..7 s
    cfg.retry = "any-song"  # this code's earlier rule: a click window needs only the target
    starts = [w.draw(np.random.default_rng(i)).start for i in range(30)]
    assert sum(not 250 < f < 350 for f in starts) >= 10
    assert D.DataConfig().retry == "same-song"


def test_augmentation_ratio_in_hundredths_and_engines_agree_in_timing():
    from stage_min.train import augment

    draws = [augment.draw(np.random.default_rng(i), 1.0, 0.8, 1.2, 0.0, 4) for i in range(100)]
    assert all(abs(d.ratio * 100 - round(d.ratio * 100)) < 1e-9 and 0.8 <= d.ratio <= 1.2 for d in draws)  # the original's 0.01 steps
    assert len({d.ratio for d in draws}) > 20
    pytest.importorskip("pylibrb")
    import librosa

    rng = np.random.default_rng(0)
    x = np.zeros(2 * SR, np.float32)  # clicks of noise on a 0.25 s grid: timing is what must agree
    for t in np.arange(0, 2, 0.25):
        i = int(t * SR)
        x[i:i + 800] += rng.standard_normal(800).astype(np.float32) * np.exp(-np.arange(800) / 150)
    aug = augment.Augmentation(0.9, 2)
    a = augment.apply(x, SR, aug, int(1.8 * SR), engine="pylibrb")
    np.testing.assert_array_equal(a, augment.apply(x, SR, aug, int(1.8 * SR), engine="pylibrb"))  # deterministic
    b = augment.apply(x, SR, aug, int(1.8 * SR))
    ea, eb = librosa.onset.onset_strength(y=a, sr=SR), librosa.onset.onset_strength(y=b, sr=SR)
    assert np.corrcoef(ea, eb)[0, 1] > 0.9  # same timing; the samples differ (docs/training.md)
    with pytest.raises(ValueError, match="augment-engine"):
        D.DataConfig(augment_engine="sox").check()
