"""evaluate.py and stage_min.eval.evaluation: beat scores on click tracks, FAD/KAD, pitch agreement on
synthetic songs, the experiments end to end on a tiny random STAGE checkpoint, and every bad input."""
import csv
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stage_min.eval import evaluation as E
from stage_min.io.metronome import beat_times, metronome

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402

SR = 32000


# ---- beat scores ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bpm, seconds", [(100, 4.0), (120, 8.0), (179, 6.0)])
def test_click_track_against_its_own_tempo_scores_high(bpm, seconds):
    # 4 s: with mir_eval's usual trimming of beats before 5 s there would be nothing left to score
    s = E.beat_scores(metronome(bpm, seconds), SR, beat_times(bpm, seconds))
    assert s["f_measure"] >= 0.95
    assert abs(s["tempo_bpm"] - bpm) < 0.03 * bpm
    assert s["n_beats"] == len(s["beats"]) and s["n_reference_beats"] == len(beat_times(bpm, seconds))


@pytest.mark.parametrize("reference_bpm", [102, 138])  # 15 % off 120
def test_click_track_against_a_tempo_15_percent_off_scores_low(reference_bpm):
    assert E.beat_scores(metronome(120, 8.0), SR, beat_times(reference_bpm, 8.0))["f_measure"] < 0.4


@pytest.mark.parametrize("shift", [0.1, -0.1])
def test_click_track_shifted_by_100ms_scores_near_zero(shift):
    reference = beat_times(120, 8.0) + shift
    assert E.beat_scores(metronome(120, 8.0), SR, reference[reference >= 0])["f_measure"] < 0.1


def test_f_measure_edge_cases_and_one_tracker_for_training_data():
    assert np.isnan(E.f_measure([], [1.0, 2.0]))  # no reference: undefined, left out of means
    assert E.f_measure([1.0, 2.0], []) == 0.0
    assert np.isnan(E.tempo_of([1.0]))
    from stage_min.train import data as D

    click = metronome(120, 4.0)  # training data's tracker adds downbeats; its beat times are evaluation's
    assert np.array_equal(D.track_beats(click, SR)[0], E.track_beats(click, SR))
    with pytest.raises(E.EvalError, match="unknown beat tracker"):
        E.track_beats(np.zeros(SR), SR, "madmom")


# ---- FAD / KAD ------------------------------------------------------------------------------------
def test_fad_and_kad_near_zero_for_the_same_set_and_grow_with_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 1
    assert abs(E.fad(x, x)) < 1e-8
    assert abs(E.kad(x, x)) < 200 / len(x)  # -(200/n)(1 - mean kernel): see kad's docstring
    y = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 1  # another draw, other covariance
    noise = rng.normal(size=x.shape)
    fads = [E.fad(x + s * noise, x) for s in (0, 0.1, 0.3, 1, 3)]
    kads = [E.kad(x + s * noise, x) for s in (0, 0.1, 0.3, 1, 3)]
    assert all(a < b for a, b in zip(fads, fads[1:])) and all(a < b for a, b in zip(kads, kads[1:]))
    assert fads[-1] > 10 and kads[-1] > 1 and E.fad(y, x) > fads[1]
    with pytest.raises(E.EvalError, match="at least 2 rows"):
        E.fad(x[:1], x)


# ---- pitch agreement ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_songs():
    from stage_min.toy import synth

    rng = np.random.default_rng(7)
    return [synth.make_song(rng, 6.0, style=synth.TOY) for _ in range(4)]


def test_real_bass_agrees_with_the_chords_and_a_tritone_away_does_not(toy_songs):
    import librosa

    # measured on these songs: 0.98-1.00 for the real bass, 0.00 a tritone away (docs/evaluation.md)
    for song in toy_songs:
        assert E.pitch_agreement(song["bass"], song["chords"], SR) > 0.9
        assert E.pitch_agreement(song["bass"], song["chords"] + song["drums"], SR) > 0.8  # harmony = the context mix
        tritone = librosa.effects.pitch_shift(song["bass"], sr=SR, n_steps=6)
        assert E.pitch_agreement(tritone, song["chords"], SR) < 0.1
    noise = np.random.default_rng(0).normal(scale=0.1, size=6 * SR).astype(np.float32)
    assert E.pitch_agreement(noise, toy_songs[0]["chords"], SR) < 0.3  # no pitch: about 1/12
    assert np.isnan(E.pitch_agreement(np.zeros(6 * SR, np.float32), toy_songs[0]["chords"], SR))


def test_chord_roots_match_the_songs_bars(toy_songs):
    agree, bars = 0, 0
    for song in toy_songs:
        roots = E.chord_roots(song["chords"], SR)
        times = np.arange(len(roots)) * E.PITCH_HOP / E.PITCH_RATE
        marks = song["chord_roots"] + [(6.0, None)]
        for (start, root), (end, _) in itertools.pairwise(marks):
            inside = roots[(times >= start + 0.1) & (times < end) & (roots >= 0)]  # past the chord change
            if len(inside) >= 5:
                bars += 1
                agree += np.bincount(inside, minlength=12).argmax() == root
    assert bars >= 12 and agree / bars >= 0.9
    assert E.is_pitched("bass") and E.is_pitched("guitar") and not E.is_pitched("drums")


# ---- end to end on a tiny random checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from stage_min.toy.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("songs"), 3, seconds=3.0)


def read_outputs(out: Path) -> tuple[dict, list]:
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(results["rows"])
    return results, table


def test_tempo_end_to_end(stage_run, tmp_path, capsys):
    out = tmp_path / "tempo"
    evaluate.main(["tempo", "--model", str(stage_run), "--bpm", "100,140", "--seeds", "2", "--seconds", "1.5",
                   "--out", str(out), "--prompt", "rock drums", "--batch-size", "1", "--first-seed", "40"])
    assert "with the click track" in capsys.readouterr().out
    results, table = read_outputs(out)
    assert results["model"] == str(stage_run) and results["bpms"] == [100, 140] and results["seeds"] == [40, 41]
    rows = results["rows"]
    assert sorted((r["bpm"], r["seed"]) for r in rows) == [(100, 40), (100, 41), (140, 40), (140, 41)]
    assert {r["meter"] for r in rows} == {4} and results["meters"] == [4]
    assert {r["audio"] for r in rows} == {f"audio/bpm{b}_seed{s}.wav" for b in (100, 140) for s in (40, 41)}  # names as before
    for r in rows:
        for key in ("f_measure", "f_measure_nocontext"):
            assert 0 <= r[key] <= 1
        assert r["reference_beats"] == pytest.approx(beat_times(r["bpm"], 1.5), abs=1e-3)
        for key in ("audio", "audio_nocontext"):
            assert sf.info(str(out / r[key])).frames == 75 * 640  # 1.5 s: 75 frames of 20 ms
        assert (out / r["audio"].replace(".wav", "_mix.wav")).exists()
    assert results["mean"] == pytest.approx(np.mean([r["f_measure"] for r in rows]))
    assert results["mean_nocontext"] == pytest.approx(np.mean([r["f_measure_nocontext"] for r in rows]))
    assert [(p["bpm"], p["meter"]) for p in results["per_bpm"]] == [(100, 4), (140, 4)]
    assert results["per_meter"][0]["f_measure"] == pytest.approx(results["mean"])
    assert {"bpm", "seed", "f_measure", "f_measure_nocontext", "tempo_bpm", "n_beats"} <= set(table[0])
    assert "beats" not in table[0]  # lists stay in the JSON


def test_tempo_with_meters(stage_run, tmp_path, capsys, monkeypatch):
    from stage_min.io import metronome as M

    made = []
    real = M.metronome
    monkeypatch.setattr(M, "metronome", lambda bpm, seconds, beats_per_bar=4, **kw: made.append((bpm, beats_per_bar))
                        or real(bpm, seconds, beats_per_bar, **kw))
    out = tmp_path / "meters"
    evaluate.main(["tempo", "--model", str(stage_run), "--bpm", "120,150", "--meter", "3,5", "--seeds", "1",
                   "--seconds", "1.5", "--out", str(out)])
    assert "3 beats a bar" in capsys.readouterr().out
    results, table = read_outputs(out)
    assert made == [(120, 3), (120, 5), (150, 3), (150, 5)]  # every tempo with every meter
    assert [(r["bpm"], r["meter"]) for r in results["rows"]] == made and results["meters"] == [3, 5]
    assert results["rows"][0]["audio"] == "audio/bpm120_m3_seed0.wav" and (out / "audio" / "bpm150_m5_seed0_mix.wav").exists()
    assert [(p["bpm"], p["meter"]) for p in results["per_bpm"]] == made
    for p in results["per_meter"]:
        rows = [r for r in results["rows"] if r["meter"] == p["meter"]]
        assert p["f_measure"] == pytest.approx(np.mean([r["f_measure"] for r in rows]))
        assert p["f_measure_nocontext"] == pytest.approx(np.mean([r["f_measure_nocontext"] for r in rows]))
    assert [p["meter"] for p in results["per_meter"]] == [3, 5] and table[0]["meter"] == "3"


def test_accompany_end_to_end(stage_run, dataset, tmp_path, capsys):
    out = tmp_path / "acc"
    evaluate.main(["accompany", "--model", str(stage_run), "--data", str(dataset), "--target", "drums",
                   "--seconds", "1.5", "--out", str(out)])
    assert "fad_encodec" in capsys.readouterr().out
    results, table = read_outputs(out)
    from stage_min.train.data import find_songs, split_songs

    _, held = split_songs(find_songs(dataset), 0.1, 0)  # train.py's defaults
    assert [r["song"] for r in results["rows"]] == [s.name for s in held] and results["n_songs"] == len(held)
    for key in ("fad_encodec", "kad_encodec", "fad_encodec_nocontext", "kad_encodec_nocontext"):
        assert np.isfinite(results[key])
    assert results["fad_encodec"] >= 0
    row = results["rows"][0]
    for key in ("f_measure", "f_measure_nocontext", "f_measure_reference"):
        assert 0 <= row[key] <= 1
    assert sorted(row["context_stems"]) == ["bass", "chords"] and table[0]["context_stems"] == "bass+chords"
    beats_txt = np.loadtxt(Path(dataset) / row["song"] / "beats.txt")[:, 0]
    assert row["reference_beats"] == pytest.approx(beats_txt[beats_txt < 1.5], abs=1e-3)  # window at 0 s
    for suffix in ("generated", "nocontext", "reference", "context", "mix"):
        assert sf.info(str(out / "audio" / f"{row['song']}_{suffix}.wav")).frames == 75 * 640
    assert row["prompt"] == (Path(dataset) / row["song"] / "caption.txt").read_text().strip()
    assert results["split"] == "held-out" and "pitch_agreement" not in row and "mean_pitch_agreement" not in results


def test_accompany_all_songs_of_a_sealed_set_with_pitch(stage_run, dataset, tmp_path, capsys):
    out = tmp_path / "sealed"
    evaluate.main(["accompany", "--model", str(stage_run), "--data", str(dataset), "--target", "bass", "--split", "all",
                   "--seconds", "1.5", "--out", str(out)])
    assert "pitch agreement" in capsys.readouterr().out
    results, table = read_outputs(out)
    assert [r["song"] for r in results["rows"]] == ["song_000", "song_001", "song_002"] and results["split"] == "all"
    for key in ("pitch_agreement", "pitch_agreement_nocontext", "pitch_agreement_reference"):
        values = [r[key] for r in results["rows"]]
        assert all(0 <= v <= 1 for v in values) and key in table[0]
        assert results[f"mean_{key}"] == pytest.approx(np.mean(values))
    assert results["mean_pitch_agreement_reference"] > 0.8  # the real bass plays the chords' roots
    assert all(sorted(r["context_stems"]) == ["chords", "drums"] for r in results["rows"])


def test_long_stems_only_for_models_that_generate_in_windows(stage_run, tmp_path, monkeypatch):
    """A 20 s song, past the 30 s of positions that context and stem share: refused for a STAGE model
    without a window; a window model gets the whole span of the song as its context, in windows."""
    import torch

    from stage_min import songs
    from stage_min.io.pretrained import from_pretrained
    from stage_min.toy.synth import write_dataset

    data = write_dataset(tmp_path / "long", 2, seconds=20.0)
    model = from_pretrained(str(stage_run))
    with pytest.raises(E.EvalError, match="at most 14.98 for this model"):
        E.accompany_experiment(model, data, "bass", tmp_path / "o", seconds=20.0, split="all", progress=False)
    with pytest.raises(E.EvalError, match="at most 600"):
        E.check_seconds(601.0)
    beds = []

    def fake_windows(model, songs_, prompts, drop_context=False, **kw):  # the real windows: tests/test_songs.py
        beds.append((drop_context, [np.asarray(s) for s in songs_]))
        return [(torch.full((len(s),), 0.1), torch.zeros(4, len(s) // 640, dtype=torch.long)) for s in songs_]

    monkeypatch.setattr(songs, "accompany_songs", fake_windows)
    model.window_frames = 100  # a model trained on 2 s windows, as the toy
    E.check_seconds(600.0, model)
    results = E.accompany_experiment(model, data, "bass", tmp_path / "o", seconds=20.0, split="all", progress=False)
    (_, contexts), (dropped, silence) = beds
    assert dropped and all(not s.any() for s in silence)  # the baseline: text alone, in windows too
    from stage_min.train.data import find_songs, load_stem

    for song, context in zip(find_songs(data), contexts):  # the context: the whole 20 s of the other stems
        expected = sum(load_stem(song.stems[s], SR) for s in ("drums", "chords"))[: 20 * SR]
        assert len(context) == 20 * SR and np.allclose(context, expected, atol=1e-5)
    assert [r["start_s"] for r in results["rows"]] == [0.0, 0.0]
    assert sf.info(str(tmp_path / "o" / results["rows"][0]["audio"])).frames == 20 * SR


def test_context_probe_on_click_tracks(stage_run, tmp_path, capsys):
    """Recordings as contexts: here click tracks, whose tracked beats must be their clicks."""
    d = tmp_path / "recordings"
    d.mkdir()
    sf.write(d / "a.wav", metronome(120, 3.0), SR)
    stereo = np.stack([metronome(100, 3.0, sample_rate=44100)] * 2, axis=1)
    sf.write(d / "b.flac", stereo, 44100)  # stereo at another rate: mixed down, resampled
    sf.write(d / "c.wav", metronome(150, 2.0), SR)  # shorter than --seconds: all of it
    (d / "a-desc.txt").write_text("rock drums\n")
    (d / "b.txt").write_text("lofi drums\n")
    (d / "notes.md").write_text("not audio")
    out = tmp_path / "probe"
    evaluate.main(["context", "--model", str(stage_run), "--audio", str(d), "--seconds", "2.5", "--out", str(out),
                   "--prompt", "drums"])
    assert "tracked on each file" in capsys.readouterr().out
    results, table = read_outputs(out)
    rows = results["rows"]
    assert [r["song"] for r in rows] == ["a.wav", "b.flac", "c.wav"] and results["n_files"] == 3
    assert [r["prompt"] for r in rows] == ["rock drums", "lofi drums", "drums"]
    assert [r["seconds"] for r in rows] == [2.5, 2.5, 2.0]
    for r, bpm in zip(rows, (120, 100, 150)):
        clicks = beat_times(bpm, r["seconds"])
        assert E.f_measure(clicks, r["reference_beats"]) >= 0.9 and len(r["reference_beats"]) == len(clicks)
        for key in ("f_measure", "f_measure_nocontext"):
            assert 0 <= r[key] <= 1
        for key in ("audio", "audio_nocontext"):
            assert sf.info(str(out / r[key])).frames == round(r["seconds"] * SR)
        assert (out / r["audio"].replace("_generated", "_mix")).exists()
    assert results["mean"] == pytest.approx(np.mean([r["f_measure"] for r in rows]))
    assert "pitch_agreement" not in rows[0] and table[2]["song"] == "c.wav"


def test_context_probe_one_file_pitched_target(stage_run, tmp_path):
    from stage_min.io.pretrained import from_pretrained

    sf.write(tmp_path / "song.wav", metronome(120, 2.0), SR)
    model = from_pretrained(str(stage_run))
    results = E.context_experiment(model, E.probe_files(tmp_path / "song.wav"), "bass", tmp_path / "o", seconds=1.5,
                                   progress=False)
    row, = results["rows"]
    assert row["prompt"] == "" and row["seconds"] == 1.5 and "pitch_agreement_reference" not in row
    assert "pitch_agreement" in row and "pitch_agreement_nocontext" in row and "mean_pitch_agreement" in results


def test_codec_embeddings_are_pre_quantisation_latents_per_frame(stage_run):
    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(str(stage_run))
    emb = E.codec_embeddings(model, [np.zeros(640 * 10, np.float32), 0.1 * np.ones(640 * 5, np.float32)])
    assert emb.shape == (15, model.codec.model.config.hidden_size)


# ---- bad input --------------------------------------------------------------------------------------
def bad_cases(d, model, data):
    tempo = ["tempo", "--model", model, "--out", f"{d}/out", "--seconds", "1"]
    acc = ["accompany", "--model", model, "--target", "drums", "--out", f"{d}/out", "--seconds", "1"]
    probe = ["context", "--model", model, "--out", f"{d}/out", "--seconds", "1"]
    return [
        (["beats", f"{d}/missing.wav", "--bpm", "120"], "no such file"),
        (["beats", f"{d}/click.wav"], "give the reference as --bpm or as --beats"),
        (["beats", f"{d}/click.wav", "--bpm", "0"], "--bpm must be > 0"),
        (["beats", f"{d}/click.wav", "--beats", f"{d}/missing.txt"], "No such file"),
        (["beats", f"{d}/click.wav", "--beats", f"{d}/bad_beats.txt"], "expected '<seconds>"),
        (["beats", f"{d}/click.wav", "--bpm", "120", "--tracker", "madmom"], "invalid choice"),
        (["tempo", "--model", f"{d}/no_model", "--out", f"{d}/out", "--seconds", "1", "--bpm", "120"], "not found"),
        (tempo + ["--bpm", "100,abc"], "'abc' is not a number"),
        (tempo + ["--bpm", "100", "--first-seed", "-1"], "--first-seed must be in"),
        (tempo + ["--bpm", "100,0"], "every tempo must be > 0"),
        (tempo + ["--bpm", "-90"], "every tempo must be > 0"),
        (tempo + ["--bpm", "100,nan"], "every tempo must be > 0"),
        (tempo + ["--seeds", "0"], "--seeds must be >= 1"),
        (tempo + ["--seconds", "0"], "--seconds must be > 0"),
        (tempo + ["--seconds", "20"], "--seconds at most"),
        (tempo + ["--temperature", "0"], "temperature must be > 0"),
        (tempo + ["--out", f"{d}/click.wav"], "is a file"),
        (acc + ["--data", f"{d}/empty"], "no songs in"),
        (acc + ["--data", f"{d}/missing_data"], "does not exist"),
        (acc + ["--data", str(data), "--target", "piano"], "has a 'piano' stem"),
        (acc + ["--data", f"{d}/silent"], "no usable held-out song"),
        (acc + ["--data", str(data), "--songs", "0"], "--songs must be >= 1"),
        (acc + ["--data", str(data), "--split", "train"], "invalid choice"),
        (acc + ["--data", str(data), "--split", "all", "--target", "piano"], "no song in"),
        (acc + ["--data", f"{d}/silent", "--split", "all"], "no usable song"),
        (tempo + ["--bpm", "120", "--meter", "0"], "every meter must be 1 to 16"),
        (tempo + ["--bpm", "120", "--meter", "4,x"], "'x' is not a whole number"),
        (tempo + ["--bpm", "120", "--meter", "3,3"], "3 is given twice"),
        (tempo + ["--bpm", "120", "--seconds", "601"], "--seconds at most 600"),
        (probe + ["--audio", f"{d}/missing.wav"], "no such file or folder"),
        (probe + ["--audio", f"{d}/empty"], "holds no .wav, .flac, .mp3 file"),
        (probe + ["--audio", f"{d}/garbage.wav"], "cannot read audio"),
        (probe + ["--audio", f"{d}/short"], "too short to track beats"),
        (probe + ["--audio", f"{d}/prompt_latin1"], "not UTF-8 text"),
    ]


def make_bad_inputs(d: Path):
    sf.write(d / "click.wav", metronome(120, 2.0), SR)
    (d / "bad_beats.txt").write_text("0.5\nabc\n")
    (d / "empty").mkdir()
    (d / "empty" / "notes.txt").write_text("no audio here")
    (d / "garbage.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    (d / "short").mkdir()
    sf.write(d / "short" / "a.wav", metronome(120, 0.5), SR)
    (d / "prompt_latin1").mkdir()
    sf.write(d / "prompt_latin1" / "a.wav", metronome(120, 1.5), SR)
    (d / "prompt_latin1" / "a.txt").write_bytes("caf\xe9 drums".encode("latin-1"))
    for song in ("a", "b"):  # two songs (one held out), both silent
        (d / "silent" / song).mkdir(parents=True)
        for stem in ("drums", "bass"):
            sf.write(d / "silent" / song / f"{stem}.wav", np.zeros(2 * SR), SR)


def test_bad_input_one_line_exit_2(stage_run, dataset, tmp_path, capsys):
    make_bad_inputs(tmp_path)
    for argv, message in bad_cases(tmp_path, str(stage_run), dataset):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2, argv
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (argv, err)
    assert not (tmp_path / "out" / "results.json").exists()


def test_without_matplotlib_the_error_names_the_extra(stage_run, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["tempo", "--model", str(stage_run), "--out", str(tmp_path / "o"), "--seconds", "1"])
    assert exit_.value.code == 2 and "pip install -e .[eval]" in capsys.readouterr().err


def test_bad_input_as_a_user_sees_it(tmp_path):
    """One real subprocess: one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "tempo", "--model", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o"), "--bpm", "120,fast"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --bpm: 'fast' is not a number (want e.g. 100,120,140)"]
