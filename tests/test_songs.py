"""Whole songs (stage_min/songs.py and sample.py): stems exactly as long as their song, windows that
join without a seam, given tokens kept, stacking, continuation and folders, on a tiny random model."""
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from stage_min import delay, songs
from stage_min.generate import SamplingConfig
from stage_min.songs import encode_contexts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
from stage_min.cli import sample_job  # noqa: E402

SR, HOP = 32000, 640
FAST = SamplingConfig(cfg_coef=1.0, top_k=250)  # no guidance rows: half the work, the same windows


def tone(seconds, sr=SR, f0=110.0, extra=0):
    t = np.arange(int(seconds * sr) + extra) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 1.5 * t)) / 2
            + 0.1 * np.sin(2 * np.pi * 3 * f0 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def hearing(tiny_hf, tmp_path_factory):
    """The tiny model with a codec that hears its input (tiny.make_codec_hear): different audio, different
    codes, so that what a context holds can be checked. Returns its folder."""
    from stage_min.toy import tiny

    folder = tmp_path_factory.mktemp("hearing") / "model"
    shutil.copytree(tiny_hf[0], folder)
    rng = np.random.default_rng(0)
    files = []
    for i, f0 in enumerate([110, 220, 330]):
        files.append(folder.parent / f"fit{i}.wav")
        sf.write(files[-1], tone(4, f0=f0) + 0.05 * rng.standard_normal(4 * SR).astype(np.float32), SR)
    tiny.make_codec_hear(folder, files)
    return folder


@pytest.fixture(scope="module")
def stage_model(hearing):
    from stage_min.io.pretrained import from_pretrained

    return from_pretrained(str(hearing), stage=True)


def capture_calls(monkeypatch):
    """Record (grid, known, output) of every generate_tokens call made by songs.py."""
    calls = []
    real = songs.generate_tokens

    def spy(lm, grid, known, *args, **kwargs):
        out = real(lm, grid, known, *args, **kwargs)
        calls.append((grid.clone(), known.clone(), out.clone()))
        return out

    monkeypatch.setattr(songs, "generate_tokens", spy)
    return calls


@pytest.fixture(scope="module")
def long_song(stage_model):
    """A 16 s song (plus a partial frame) in 1.5 s windows overlapping by 0.5 s: 16 windows. (The same
    with 70 s takes about half a minute on 2 CPU cores, mostly the codec: too slow for CI.)"""
    song = tone(16, extra=123)
    rounds = []
    with pytest.MonkeyPatch.context() as mp:
        calls = capture_calls(mp)
        (audio, codes), = songs.accompany_songs(stage_model, [song], ["drums"], window_s=1.5, overlap_s=0.5,
                                                sampling=FAST, seed=0,
                                                on_window=lambda r, rows, windows, frames: rounds.append(windows[0]))
    return song, audio, codes, calls, rounds


def test_long_song_gives_a_stem_exactly_as_long(long_song):
    song, audio, codes, calls, rounds = long_song
    assert len(audio) == len(song) == 16 * SR + 123  # to the sample: the last partial frame is kept, then cut
    assert codes.shape == (4, math.ceil(len(song) / HOP)) == (4, 801)
    assert (codes != 2048).all()  # every frame generated
    assert len(rounds) == len(calls) == 16
    assert rounds[0][:2] == (0, 0) and rounds[-1][2] == codes.shape[-1]
    assert all(end - start == 75 for start, _, end in rounds)  # every window as long as asked, the last moved back
    assert torch.isfinite(audio).all() and audio.abs().max() > 0


def test_overlap_tokens_are_given_and_unchanged(long_song):
    song, audio, codes, calls, rounds = long_song
    for (grid, known, out), (start, done, end) in zip(calls, rounds):
        assert torch.equal(out[known[:1]], grid[:1][known[:1]])  # whatever is known comes out unchanged
        frames, known_frames = delay.deinterleave(grid), delay.deinterleave(known)
        C = frames.shape[-1] - (end - start) - 1
        n_given = done - start
        assert n_given == (0 if start == 0 else 25) or end == codes.shape[-1]  # the overlap (more in the last window)
        # the given frames are the stem as the previous window left it, and the final stem keeps them
        assert torch.equal(frames[0, :, C + 1:C + 1 + n_given], codes[:, start:done])
        assert torch.equal(delay.deinterleave(out)[0, :, C + 1:C + 1 + n_given], codes[:, start:done])
        # exactly those frames are known in every codebook (delay pattern), the others are sampled
        assert known_frames[0, :, C + 1:C + 1 + n_given].all()
        assert not known_frames[0, :, C + 1 + n_given:].any()


def test_window_boundaries_are_no_seam(long_song):
    """The sample-to-sample jump where two windows meet is what any frame boundary inside a window
    shows. Measured: ratio 1.00 (seeds 0 and 1); decoding each window on its own (a seam) gives 1.16."""
    song, audio, codes, calls, rounds = long_song
    x = audio.numpy()
    boundaries = sorted({done for _, done, _ in rounds[1:]})
    inside = [t for t in range(1, len(x) // HOP) if t not in boundaries]
    jump = np.abs(np.diff(x))
    ratio = jump[[b * HOP - 1 for b in boundaries]].mean() / jump[[t * HOP - 1 for t in inside]].mean()
    assert ratio < 1.05


def test_decoding_in_chunks_matches_one_decode(stage_model):
    codes = torch.randint(0, 2048, (4, 400), generator=torch.Generator().manual_seed(0))
    whole = stage_model.codec.decode(codes[None])[0, 0]
    chunked = songs.decode_long(stage_model.codec, codes, chunk=150, margin=50)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < 1e-4 * whole.abs().max()


def test_plan_windows_cover_the_song_once():
    for n_frames, n_given in [(1000, 0), (130, 0), (1000, 70), (1000, 10), (520, 0), (40, 0), (100, 100)]:
        windows = songs.plan_windows(n_frames, n_given, window=100, overlap=30)
        done = n_given
        for start, first, end in windows:
            assert first == done and start <= first < end <= n_frames
            assert end - start == min(100, n_frames)
            assert first - start >= min(30, first)  # at least the overlap is given, once there is a past
            done = end
        assert done == max(n_frames, n_given)
    with pytest.raises(ValueError):
        songs.plan_windows(100, 0, window=50, overlap=50)


def test_continuation_is_kept_and_continued(stage_model):
    song, part = tone(3.0), tone(1.3, f0=220)
    audio, codes = songs.accompany_song(stage_model, song, "drums", window_s=1, overlap_s=0.5, continuation=part,
                                        sampling=FAST, seed=0)
    assert len(audio) == len(song)
    given = stage_model.encode_context(torch.from_numpy(part))[0]  # 65 whole frames
    assert torch.equal(codes[:, :given.shape[-1]], given)
    assert (codes != 2048).all()


def test_songs_of_different_lengths_batch_together(stage_model):
    batch = songs.accompany_songs(stage_model, [tone(2.5), tone(0.7, f0=330), tone(1.2, extra=7)], ["a", "b", "c"],
                                  window_s=1, overlap_s=0.5, sampling=FAST, seed=0)
    assert [len(a) for a, _ in batch] == [int(2.5 * SR), int(0.7 * SR), int(1.2 * SR) + 7]
    assert all((c != 2048).all() for _, c in batch)


def test_stacking_conditions_each_stem_on_the_song_and_the_stems_before(stage_model, monkeypatch):
    song = tone(1.5)
    calls = capture_calls(monkeypatch)
    stems, mix = songs.stack({"drums": stage_model, "bass": stage_model}, song, "rock", window_s=1, overlap_s=0.5,
                             sampling=FAST, seed=0)
    assert list(stems) == ["drums", "bass"] and all(len(a) == len(song) for a in stems.values())
    assert torch.allclose(mix, torch.from_numpy(song) + stems["drums"] + stems["bass"])
    windows = songs.plan_windows(75, 0, 50, 25)
    assert len(calls) == 2 * len(windows)
    for stem_index, bed in [(0, song), (1, song + stems["drums"].numpy())]:
        for (grid, _, _), (start, _, end) in zip(calls[stem_index * len(windows):], windows):
            context = delay.deinterleave(grid)[:1, :, :end - start]
            expected, _ = encode_contexts(stage_model.codec, [bed[start * HOP:end * HOP]], 2048, "cpu")
            assert torch.equal(context, expected)  # the bass hears the song plus the drums
            if stem_index == 1:
                alone, _ = encode_contexts(stage_model.codec, [song[start * HOP:end * HOP]], 2048, "cpu")
                assert not torch.equal(context, alone)


# ---- sample.py -----------------------------------------------------------------------------------
def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(a) for a in argv])
    return exit_.value.code, capsys.readouterr().err


def test_cli_stack_writes_each_stem_and_the_mix(hearing, tmp_path):
    sf.write(tmp_path / "song.wav", tone(1.7, sr=44100), 44100)
    model = hearing
    sample.main([str(a) for a in ["--context", tmp_path / "song.wav", "--stems", "drums,bass", "--model", f"drums={model}",
                                  "--model", f"bass={model}", "--out", tmp_path / "out.wav", "--window", 1, "--overlap",
                                  0.5, "--cfg", 1, "--seed", 0]])
    for name in ["out_drums.wav", "out_bass.wav", "out_mix.wav"]:
        info = sf.info(str(tmp_path / name))
        assert info.frames == int(1.7 * SR) and info.samplerate == SR


def test_cli_folder_skips_unreadable_files_and_writes_the_others(hearing, tmp_path, capsys):
    songs_dir, out = tmp_path / "songs", tmp_path / "stems"
    songs_dir.mkdir()
    sf.write(songs_dir / "a.wav", tone(1.3), SR)
    sf.write(songs_dir / "b.flac", tone(0.6, f0=220), SR)
    (songs_dir / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    sf.write(songs_dir / "nan.wav", np.full(SR, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    (songs_dir / "notes.txt").write_text("not audio, not an audio name")
    sample.main([str(a) for a in ["--context", songs_dir, "--model", hearing, "--out", out, "--window", 1,
                                  "--overlap", 0.5, "--cfg", 1, "--batch", 2]])
    assert sorted(p.name for p in out.iterdir()) == ["a_stem.wav", "b_stem.wav"]  # never the song's own name
    assert sf.info(str(out / "a_stem.wav")).frames == int(1.3 * SR) and sf.info(str(out / "b_stem.wav")).frames == int(0.6 * SR)
    assert "2 unreadable file(s) skipped" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--window", 5, "--overlap", 5], "--window must be longer than --overlap"),
    (["--window", 2, "--overlap", 3], "--window must be longer than --overlap"),
    (["--overlap", -1], "--overlap must be >= 0"),
    (["--window", 20], "--window at most 14.98 s"),
    (["--stems", "drums,bass", "--model", "drums={model}"], "no model for stem bass"),
    (["--stems", "drums", "--model", "{model}"], "give --model NAME=PATH"),
    (["--model", "{model}", "--model", "{model}"], "--model given more than once"),
    (["--stems", "drums", "--model", "drums={model}", "--continue", "{d}/song.wav", "--duration", "1"], "drop --duration"),
    (["--context", "{d}/empty", "--out", "{d}/stems"], "no audio files"),
    (["--window", "inf"], "--window must be a finite number"),
    (["--overlap", "nan"], "--overlap must be >= 0"),
    (["--stems", "drums"], "no model for stem drums"),  # no toy default for a named stem
    (["--stems", "drums", "--model", "drums={model}", "--mix-out", "{d}/song.wav"], "is the --context file"),
    (["--stems", "drums,bass", "--model", "drums={model}", "--model", "bass={model}", "--mix-out", "{d}/x_bass.wav"],
     "the same file"),
    (["--context", "{d}", "--out", "{d}", "--model", "{model}"], "is the --context folder"),
])
def test_bad_song_options_one_line_exit_2_nothing_written(hearing, tmp_path, capsys, args, message):
    sf.write(tmp_path / "song.wav", tone(1.0), SR)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    argv = ["--context", tmp_path / "song.wav", "--out", tmp_path / "x.wav"]
    argv += [str(a).format(model=hearing, d=tmp_path) for a in args]
    code, err = run_main(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "song.wav"]
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["readme.txt"]


def test_outputs_are_all_checked_before_any_is_written(tmp_path):
    """A NaN in any stem, or a Ctrl-C, and no file of a stack is written."""
    paths = {n: tmp_path / f"out_{n}.wav" for n in ["drums", "bass"]}
    good = {"drums": tone(0.1), "bass": tone(0.1)}
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_job.write_outputs(paths, {**good, "bass": np.full(100, np.nan)}, tmp_path / "mix.wav", tone(0.1), [])
    with pytest.raises(KeyboardInterrupt):
        sample_job.write_outputs(paths, good, tmp_path / "mix.wav", tone(0.1), [2])
    assert list(tmp_path.iterdir()) == []
    sample_job.write_outputs(paths, good, tmp_path / "mix.wav", tone(0.1), [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.wav", "out_bass.wav", "out_drums.wav"]
