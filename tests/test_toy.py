"""The toy STAGE: its songs, its codec recipe, the one-command rebuild (a few steps), and the shipped model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stage_min.toy import gm, synth

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "stage-toy"
BASS = ROOT / "weights" / "stage-toy-bass"


def test_toy_songs_cover_tempi_meters_and_kits():
    rng = np.random.default_rng(0)
    songs = [synth.make_song(rng, 6.0, style=synth.TOY) for _ in range(60)]
    bpms = [s["bpm"] for s in songs]
    assert 70 <= min(bpms) < 85 and 165 < max(bpms) <= 180
    assert {s["beats_per_bar"] for s in songs} == {3, 4, 5}
    assert all(s["caption"].startswith("Genres: ") and ". Moods: " in s["caption"] for s in songs)
    assert len({s["caption"].split(".")[0] for s in songs}) == len(synth.KITS)
    for s in songs[:5]:  # beats on the song's grid, position 1 every beats_per_bar beats
        times = np.array([t for t, _ in s["beats"]])
        np.testing.assert_allclose(np.diff(times), 60 / s["bpm"], atol=1 / 32000)
        assert [p for _, p in s["beats"]][:s["beats_per_bar"] + 1] == [*range(1, s["beats_per_bar"] + 1), 1]


def test_tempo_change_songs_change_tempo_between_bars_only():
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(10):
        s = synth.make_song(rng, 8.0, style=synth.TOY_TEMPO_CHANGES)
        times, positions = np.array([t for t, _ in s["beats"]]), [p for _, p in s["beats"]]
        periods = np.diff(times)
        for i in range(1, len(periods)):
            if positions[i] != 1:  # inside a bar the beat period stays
                assert abs(periods[i] - periods[i - 1]) < 1e-3
            else:
                changed += abs(periods[i] - periods[i - 1]) > 1e-3
    assert changed >= 5  # and between bars it often changes


def test_default_songs_unchanged():
    """The original synthetic songs (used by the training tests) are drawn exactly as before."""
    song = synth.make_song(np.random.default_rng(2), 4.0)
    assert song["caption"].endswith(("major", "minor")) and song["beats_per_bar"] == 4
    period = np.diff([t for t, _ in song["beats"]])[0] * 32000
    assert period % synth.FRAME == 0 and 91 < song["bpm"] < 151


def test_codec_recipe_runs_and_fits_codebooks():
    from stage_min.toy.codec_train import CodecTrainConfig, roundtrip, train_codec

    cfg = CodecTrainConfig(songs=1, song_seconds=3.0, steps=2, finetune_steps=1, batch_size=2, kmeans_frames=1000,
                           codebook_size=16)
    model = train_codec(cfg, log=lambda s: None)
    assert model.config.num_quantizers == 4
    for layer in model.quantizer.layers:  # k-means gave distinct centroids
        assert torch.unique(layer.codebook.embed, dim=0).shape[0] > 8
    audio = synth.make_song(np.random.default_rng(1), 2.0, style=synth.TOY)["drums"]
    assert roundtrip(model, audio).shape == audio.shape


def test_toy_rebuild_command_runs_a_few_steps(tmp_path, monkeypatch):
    """`python -m stage_min.toy` end to end at toy-of-a-toy size: songs, codec, base, both LMs, package;
    then resumed: every phase is found done, and the report lists their times."""
    from stage_min.io.loading import follow_latest
    from stage_min.io.pretrained import from_pretrained
    from stage_min.toy import recipe as toy

    out, work = tmp_path / "model", tmp_path / "work"
    args = [str(out), "--work", str(work), "--songs", "5", "--song-seconds", "5", "--steps", "3", "--no-eval",
            "--codec-steps", "2", "--codec-songs", "1", "--cooldown-steps", "1", "--cooldown-lr", "5e-4"]
    toy.main(args)
    for folder, target, context in ((out, "drums", "bass,chords"), (tmp_path / "model-bass", "bass", "drums,chords")):
        config = json.loads((folder / "config.json").read_text())
        assert config["window_seconds"] == toy.WINDOW_SECONDS and config["trained_steps"] == 3
        assert config["sampling"] == {"temperature": toy.TEMPERATURE}  # the toy's own, used unless one is given
        model = from_pretrained(str(folder))
        assert model.window_frames == round(toy.WINDOW_SECONDS * 50) and model.lm.cfg.card == 256
        audio, codes = model.accompany([torch.zeros(32000)], [""], 25, seed=0)
        assert audio.shape == (1, 1, 25 * 640) and codes.shape == (1, 4, 25)
        run = work / f"lm-{target}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {m["step"]: m["lr"] for m in metrics if "lr" in m}[3] == 5e-4  # the last step is the cooldown's
        train = json.loads((follow_latest(run) / "config.json").read_text())["train"]
        assert train["data_cfg"]["target"] == target and train["data_cfg"]["context_stems"] == context.split(",")
        assert train["lr"] == 1e-3 and train["cooldown_steps"] == 1
    codec_report = json.loads((work / "codec" / "report.json").read_text())
    assert set(codec_report) == {"drums", "bass", "chords", "bass+chords", "mix"}
    phases = json.loads((work / "phases.json").read_text())
    assert list(phases) == ["songs", "codec", "base", "lm", "package"]
    assert all(v["done"] and v["seconds"] >= 0 for v in phases.values())
    before = (out / "model.safetensors").read_bytes()
    toy.main(args)  # resumed: nothing is redone, nothing is refused
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((work / "phases.json").read_text()) == phases
    report = toy.report(work)
    assert "lm " in report and "in all:" in report
    # the evaluation phases, on sets of a song or two: both models, both sets, the probe on the sealed one
    monkeypatch.setattr(toy, "VALIDATION", toy.EvalSet("validation", bpms=(120,), meters=(3, 4), seeds=(0,), songs_seed=7,
                                                       n_songs=2, diagnostics=True))
    monkeypatch.setattr(toy, "SEALED", toy.EvalSet("sealed", bpms=(130,), meters=(5,), seeds=(9,), songs_seed=8, n_songs=1,
                                                   long_seed=9, n_long=1))
    monkeypatch.setattr(toy, "EVAL_SECONDS", 2.0)
    monkeypatch.setattr(toy, "LONG_SECONDS", 4.0)
    probe = tmp_path / "probe"
    probe.mkdir()
    import soundfile as sf

    from stage_min.io.metronome import metronome
    sf.write(probe / "clicks.wav", metronome(100.0, 3.0), 32000)
    toy.main([a for a in args if a != "--no-eval"] + ["--probe", str(probe)])
    val = json.loads((work / "eval" / "validation" / "summary.json").read_text())
    sealed = json.loads((work / "eval" / "sealed" / "summary.json").read_text())
    assert {"tempo_f1", "tempo_f1_nocontext", "tempo_f1_m3", "tempo_f1_m4", "songs_f1", "songs_f1_reference",
            "songs_bass_only_f1", "songs_chords_only_f1"} <= set(val["drums"])
    assert {"tempo_f1_m5", "songs_f1", "long_f1", "probe_f1", "probe_f1_nocontext"} <= set(sealed["drums"])
    assert {"songs_f1", "songs_pitch", "songs_pitch_nocontext", "songs_pitch_reference", "long_pitch"} <= set(sealed["bass"])
    assert sealed["bass"]["songs_pitch_reference"] > 0.8  # the real bass plays the chords' roots
    assert list(json.loads((work / "phases.json").read_text()))[-2:] == ["eval-validation", "eval-sealed"]
    table = toy.report(work)
    assert "sealed" in table.splitlines()[0] and "validation" in table.splitlines()[0] and "songs_pitch" in table


@pytest.mark.parametrize("folder", [TOY, BASS], ids=["drums", "bass"])
def test_shipped_toy_loads_small_and_fp16(folder):
    from safetensors import safe_open

    from stage_min.io.pretrained import from_pretrained

    if not (folder / "config.json").exists():
        pytest.skip(f"{folder} is not built")
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 20 * 2**20
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.startswith("lm."))).dtype == torch.float16
    model = from_pretrained(str(folder))
    assert next(model.lm.parameters()).dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not (TOY / "config.json").exists(), reason="weights/stage-toy is not built")
@pytest.mark.skipif(not gm.available(), reason="FluidSynth or a GM soundfont is not installed (.ci/run installs them)")
def test_shipped_codec_keeps_the_hits():
    """Held-out GM-rendered drums (a seed the codec never saw) through the shipped codec: the decoded audio
    has the original's onsets, scores the same beat F1 against the song's grid, keeps its level, and has
    no train of clicks inside each hit (its crest factor stays within 3 dB of the original's)."""
    from stage_min.eval.evaluation import beat_scores
    from stage_min.io.pretrained import from_pretrained
    from stage_min.toy.codec_train import crest_db, onset_f1

    model = from_pretrained(str(TOY))
    songs = synth.make_songs(np.random.default_rng(4242), 4, 6.0, style=synth.TOY_GM)
    onsets, beat_gap, crest_gap = [], [], []
    for song in songs:
        x = song["drums"]
        with torch.no_grad():
            y = model.codec.decode(model.codec.encode(torch.from_numpy(x)[None, None]))[0, 0, :len(x)].numpy()
        onsets.append(onset_f1(x, y))
        ref = np.array([t for t, _ in song["beats"]])
        beat_gap.append(beat_scores(x, 32000, ref)["f_measure"] - beat_scores(y, 32000, ref)["f_measure"])
        crest_gap.append(abs(crest_db(y) - crest_db(x)))
        # the level, roughly: measured 1.16-2.08x the input's RMS on these songs (the Power kit decodes loudest)
        assert 0.5 < np.sqrt(np.mean(y ** 2) / np.mean(x ** 2)) < 2.5
    # measured: onset F1 0.82-1.0 (mean 0.93), crest factor 0.5-3.3 dB off (mean 2.3)
    assert np.mean(onsets) >= 0.9 and max(beat_gap) <= 0.1 and np.mean(crest_gap) <= 3.0, (onsets, beat_gap, crest_gap)


@pytest.mark.skipif(not (TOY / "config.json").exists(), reason="weights/stage-toy is not built")
def test_main_command_runs_offline_on_the_toy(tmp_path):
    """The Quick start command, as a user types it: no --model, the toy is used and says so."""
    import subprocess
    import sys

    import soundfile as sf

    out = tmp_path / "drums.wav"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--bpm", "120", "--duration", "8", "--out", str(out),
                        "--seed", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "toy STAGE drums model" in r.stderr
    audio, sr = sf.read(out)
    assert sr == 32000 and len(audio) == 8 * 32000 and np.isfinite(audio).all()
    assert 0.005 < np.sqrt(np.mean(audio ** 2)) and np.abs(audio).max() <= 1.0  # drums, not silence


@pytest.mark.skipif(not (TOY / "config.json").exists(), reason="weights/stage-toy is not built")
def test_shipped_toy_plays_closer_to_the_click_than_without_it():
    """What the shipped toy does measure (MODEL_CARD.md): 4 s stems at 133 BPM (a tempo no evaluation set
    uses), 6 fixed seeds x 3 rows, scored against the click's beats, at the toy's own temperature. Measured
    over seeds 0-7: a per-seed mean F1 of 0.905-1.0 with the click (mean 0.966) and 0.0-0.162 with the
    context dropped (mean 0.052); the gap per seed 0.76-1.0. The bounds sit about seven standard errors
    of a 6-seed mean below the measured means; the first is the earlier toy's target (0.7 at 4 s)."""
    from stage_min.eval.evaluation import beat_scores
    from stage_min.io.metronome import beat_times, metronome
    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(str(TOY))
    bpm, reference = 133.0, beat_times(133.0, 4.0)
    click = torch.from_numpy(metronome(bpm, 4.0))
    with_click, without = [], []
    for seed in range(6):
        audio, _ = model.accompany([click] * 3, [""] * 3, 200, seed=seed)
        plain, _ = model.generate([""] * 3, 200, seed=seed)
        with_click += [beat_scores(a[0].numpy(), 32000, reference)["f_measure"] for a in audio]
        without += [beat_scores(a[0].numpy(), 32000, reference)["f_measure"] for a in plain]
    assert np.mean(with_click) >= 0.85, np.mean(with_click)
    assert np.mean(with_click) - np.mean(without) >= 0.6, (np.mean(with_click), np.mean(without))


@pytest.mark.skipif(not (BASS / "config.json").exists(), reason="weights/stage-toy-bass is not built")
@pytest.mark.skipif(not gm.available(), reason="FluidSynth or a GM soundfont is not installed (.ci/run installs them)")
def test_shipped_bass_toy_plays_on_the_songs_beats():
    """The shipped bass toy (its MODEL_CARD.md): 4 s of bass over 4 GM songs it never heard (seed 7777),
    context drums + chords, scored against the songs' beats, 6 seeds. Measured over seeds 0-7: a per-seed
    mean F1 of 0.73-0.89 (mean 0.80) with the context, 0.14-0.32 (mean 0.21) without; the gap 0.48-0.69.
    Its pitch is not tested: it does not follow the chords' roots (the card measures why: the codec)."""
    from stage_min.eval.evaluation import beat_scores
    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(str(BASS))
    songs = synth.make_songs(np.random.default_rng(7777), 4, 6.0, style=synth.TOY_GM)
    contexts = [torch.from_numpy((s["drums"] + s["chords"])[:4 * 32000]) for s in songs]
    references = [[t for t, _ in s["beats"] if t < 4.0] for s in songs]
    with_context, without = [], []
    for seed in range(6):
        audio, _ = model.accompany(contexts, [s["caption"] for s in songs], 200, seed=seed)
        plain, _ = model.generate([s["caption"] for s in songs], 200, seed=seed)
        with_context += [beat_scores(a[0].numpy(), 32000, r)["f_measure"] for a, r in zip(audio, references)]
        without += [beat_scores(a[0].numpy(), 32000, r)["f_measure"] for a, r in zip(plain, references)]
    assert np.mean(with_context) >= 0.7, np.mean(with_context)
    assert np.mean(with_context) - np.mean(without) >= 0.4, (np.mean(with_context), np.mean(without))


@pytest.mark.skipif(not (BASS / "config.json").exists(), reason="weights/stage-toy-bass is not built")
def test_the_two_toys_stack_over_the_example_song(tmp_path):
    """The README's stacking command: drums, then bass over the chords and those drums, each as long as the
    example song, and a level-matched mix of the three."""
    import soundfile as sf

    import sample

    example = ROOT / "weights" / "examples" / "chords-only.ogg"
    sample.main(["--context", str(example), "--stems", "drums,bass", "--model", f"drums={TOY}", "--model", f"bass={BASS}",
                 "--out", str(tmp_path / "band.wav"), "--seed", "0"])
    song, sr = sf.read(example, dtype="float32")
    outputs = {n: sf.read(tmp_path / f"band_{n}.wav", dtype="float32")[0] for n in ("drums", "bass", "mix")}
    assert sr == 32000 and all(abs(len(a) - len(song)) < 640 for a in outputs.values())
    assert all(np.sqrt(np.mean(a ** 2)) > 1e-3 for a in outputs.values())  # three audible files
    assert not np.allclose(outputs["drums"][:32000], outputs["bass"][:32000], atol=1e-2)


def test_toy_rebuild_failure_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    """A phase that fails (here: FluidSynth dying mid-render) stops the rebuild with one line that says how
    to resume; the phases done before it stay done."""
    from stage_min.toy import recipe as toy

    def broken(*a, **k):
        raise gm.RenderError("fluidsynth failed (-11): segmentation fault")

    monkeypatch.setattr(toy, "make_codec", broken)
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as exit_:
        toy.main([str(tmp_path / "model"), "--work", str(work), "--songs", "2", "--song-seconds", "2", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and err[-1].startswith("error: fluidsynth failed") and "resume" in err[-1]
    phases = json.loads((work / "phases.json").read_text())
    assert phases["songs"]["done"] and not phases["codec"]["done"]


@pytest.mark.parametrize("args, message", [
    (["--cooldown-steps", "5", "--steps", "5"], "--cooldown-steps must be below --steps"),
    (["--probe", "/nonexistent"], "no such folder"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--cooldown-steps", "-1"], "--cooldown-steps must be >= 0"),
    (["--cooldown-lr", "nan"], "--cooldown-lr must be > 0"),
    (["--cooldown-lr", "0"], "--cooldown-lr must be > 0"),
    (["--song-seconds", "nan"], "--song-seconds must be > 0"),
    (["--out-exists"], "already exists"),
])
def test_toy_rebuild_refuses_bad_options_before_any_work(tmp_path, capsys, args, message):
    from stage_min.toy import recipe as toy

    out = tmp_path / "model"
    if args == ["--out-exists"]:
        out.mkdir()
        (out / "config.json").write_text("{}")
        args = []
    with pytest.raises(SystemExit) as exit_:
        toy.main([str(out), "--work", str(tmp_path / "work"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()  # nothing written
    if out.exists():
        assert (out / "config.json").read_text() == "{}"
