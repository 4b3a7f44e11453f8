"""The toy's sampled instruments (stage_min/toy/gm.py): the notes the numpy synth draws, played by FluidSynth
on General MIDI kits and programs, and the numpy sounds when FluidSynth is absent."""
import numpy as np
import pytest

from stage_min.toy import gm, synth

needs_fluidsynth = pytest.mark.skipif(not gm.available(), reason="FluidSynth, mido or a GM soundfont is not installed "
                                      "(.ci/run installs them: apt install fluidsynth timgm6mb-soundfont)")


@needs_fluidsynth
def test_gm_songs_play_their_notes_on_the_beat():
    """The rendered drums and bass hit where the song's beats are (onset F1 against the beats, 50 ms), each
    stem peaks at its set level, and the song keeps the numpy song's notes, beats and caption."""
    import librosa
    import mir_eval

    # one generator per song: a GM song draws its kit and programs after its notes, so only a song's own
    # seed gives the numpy song of the same notes
    plain = [synth.make_songs(np.random.default_rng(s), 1, 6.0, style=synth.TOY)[0] for s in range(6)]
    songs = [synth.make_songs(np.random.default_rng(s), 1, 6.0, style=synth.TOY_GM)[0] for s in range(6)]
    recalls = []
    for song, same in zip(songs, plain):
        assert song["beats"] == same["beats"] and song["caption"] == same["caption"] and song["events"] == same["events"]
        assert not np.allclose(song["drums"], same["drums"], atol=1e-3)  # not the numpy sounds
        beats = np.array([t for t, _ in song["beats"]])
        for part in ("drums", "bass"):
            assert np.abs(song[part]).max() == pytest.approx(gm.PEAK[part], rel=1e-5)
            onsets = librosa.onset.onset_detect(y=song[part], sr=synth.SAMPLE_RATE, units="time")
            # every beat has a kick and a bass note; onsets between beats (hats, extra kicks) are not scored
            recalls.append(mir_eval.onset.f_measure(beats, onsets, window=0.05)[2])
    # measured on seeds 0-11: 0.87-1.0 per song, 0.96 on average (a beat in the first 60 ms has no onset to find)
    assert min(recalls) >= 0.8 and np.mean(recalls) >= 0.9, recalls


@needs_fluidsynth
def test_gm_songs_draw_two_or_more_kits_and_programs_per_part():
    songs = [synth.make_song(np.random.default_rng(s), 2.0, style=synth.TOY_GM) for s in range(40)]
    for part, choices in (("drums", {k for kits in gm.DRUM_KITS.values() for k in kits}),
                          ("bass", set(gm.BASS_PROGRAMS)), ("chords", set(gm.CHORD_PROGRAMS))):
        drawn = {s["programs"][part] for s in songs}
        assert len(drawn) >= 2 and drawn <= choices, (part, drawn)
    for s in songs:  # each caption's genre keeps its own two kits
        kit = next(k for k, v in synth.KITS.items() if v["genres"] in s["caption"])
        assert s["programs"]["drums"] in gm.DRUM_KITS[kit]


def test_without_fluidsynth_gm_songs_fall_back_to_the_numpy_sounds(monkeypatch, capsys):
    monkeypatch.setattr(gm, "available", lambda: False)
    monkeypatch.setattr(synth, "_warned", set())
    songs = [synth.make_songs(np.random.default_rng(s), 1, 3.0, style=synth.TOY_GM)[0] for s in (5, 6)]
    plain = [synth.make_songs(np.random.default_rng(s), 1, 3.0, style=synth.TOY)[0] for s in (5, 6)]
    for song, same in zip(songs, plain):
        for part in ("drums", "bass", "chords"):
            np.testing.assert_array_equal(song[part], same[part])
    err = capsys.readouterr().err
    assert err.count("FluidSynth or a GM soundfont is missing") == 1  # warned once, not per song


def test_midi_ticks_are_samples(tmp_path):
    """One tick is one sample at any rate the songs use, so notes land on their sample."""
    mido = pytest.importorskip("mido")
    gm.write_midi(tmp_path / "a.mid", [(32000, 640, 36, 100, 25), (48000, 640, 38, 90, None)], gm.DRUM_CHANNEL, 32000)
    midi = mido.MidiFile(tmp_path / "a.mid")
    starts = [m for m in midi if m.type == "note_on" and m.velocity > 0]
    times = np.cumsum([m.time for m in midi])  # seconds, at the default tempo
    on_times = [t for t, m in zip(times, midi) if m.type == "note_on" and m.velocity > 0]
    assert [m.note for m in starts] == [36, 38] and np.allclose(on_times, [1.0, 1.5])
    assert [m.program for m in midi if m.type == "program_change"] == [25]


@needs_fluidsynth
def test_synth_command_writes_gm_songs(tmp_path):
    import soundfile as sf

    synth.main([str(tmp_path / "gm"), "--songs", "2", "--seconds", "2", "--seed", "4", "--sounds", "gm"])
    synth.main([str(tmp_path / "plain"), "--songs", "2", "--seconds", "2", "--seed", "4"])
    for song in ("song_000", "song_001"):
        gm_drums, sr = sf.read(tmp_path / "gm" / song / "drums.wav", dtype="float32")
        plain = sf.read(tmp_path / "plain" / song / "drums.wav", dtype="float32")[0]
        assert sr == synth.SAMPLE_RATE and len(gm_drums) == len(plain) == 2 * sr
        assert abs(np.abs(gm_drums).max() - gm.PEAK["drums"]) < 1e-3 and not np.allclose(gm_drums, plain, atol=1e-2)
    assert (tmp_path / "gm" / "song_000" / "beats.txt").read_text() == (tmp_path / "plain" / "song_000" / "beats.txt").read_text()
