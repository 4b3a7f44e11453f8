"""Measure whether generated stems play along with their context (beat F-measure, FAD, KAD, pitch agreement).

    python evaluate.py beats AUDIO (--bpm 120 [--offset 0] | --beats beats.txt) [--tracker librosa|beat_this]
    python evaluate.py tempo --model M --bpm 100,110,120,130,140,150,160,170 [--meter 3,4,5] --seeds 3 --seconds 10 --out DIR [--prompt ...]
    python evaluate.py accompany --model M --data DIR --target drums --out DIR2 [--split held-out|all] [--songs N] [--seconds S]
    python evaluate.py context --model M --audio FILE_OR_DIR [--target drums] [--seconds 10] --out DIR3 [--prompt ...]

beats prints one JSON line. tempo, accompany and context write DIR/results.json, DIR/results.csv,
DIR/report.png and the audio under DIR/audio/. docs/evaluation.md lists every field.
"""
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stage_min.io.audio import AudioError, load_audio
from stage_min.cli.options import (OneLineParser, add_sampling_options, check_sampling, sampling_given, warnings_via_tqdm)
from stage_min.eval.evaluation import SPLITS, TRACKERS, EvalError, check_seconds

SAMPLE_RATE = 32000  # `beats` scores audio at EnCodec's rate, as the experiments do
MAX_BPM = 1000.0  # as sample.py: faster than any music; a limit also keeps the reference's size sane
MAX_BEATS_BYTES = 16 << 20  # a beats.txt of a few hours is well under 1 MiB
MAX_METER = 16  # beats per bar: more is no meter a click track can convey


def add_model_options(p):
    p.add_argument("--model", required=True, help="model folder, checkpoint file or hub id (as sample.py)")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft / official STAGE checkpoints (default: the one the checkpoint bundles, else google-t5/t5-base)")
    p.add_argument("--out", required=True, help="output folder (created)")
    add_sampling_options(p)  # each None unless given: the model's own setting, as sample.py
    p.add_argument("--batch-size", type=int, default=8, help="stems generated per call")
    p.add_argument("--tracker", default="librosa", choices=TRACKERS, help="beat tracker that scores the stems (beat_this: pip install beat-this)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("beats", help="score one audio file's beats")
    b.add_argument("audio", help="audio file to score (a stem, or a stem with its context)")
    b.add_argument("--bpm", type=float, help="reference: a steady tempo... (give --bpm or --beats)")
    b.add_argument("--offset", type=float, default=0.0, help="...whose first beat is at this time (s)")
    b.add_argument("--beats", help="reference: a beats.txt file (one '<seconds> [<position in bar>]' per line), instead of --bpm")
    b.add_argument("--tracker", default="librosa", choices=TRACKERS, help="beat tracker run on the audio (beat_this: pip install beat-this)")
    t = sub.add_parser("tempo", help="stems from click tracks, scored against the clicks")
    add_model_options(t)
    t.add_argument("--bpm", default="100,110,120,130,140,150,160,170", help="comma-separated tempos")
    t.add_argument("--seeds", type=int, default=3, help="stems per tempo (seeds FIRST..FIRST+N-1)")
    t.add_argument("--first-seed", type=int, default=0, help="FIRST: start the seeds here, e.g. a sealed range no "
                   "checkpoint, temperature or recipe was chosen on")
    t.add_argument("--meter", default="4", help="comma-separated beats per bar of the click tracks (which clicks are "
                   "downbeats), e.g. 3,4,5: every tempo with every meter")
    t.add_argument("--seconds", type=float, default=10.0, help="length of each stem")
    t.add_argument("--prompt", default="", help="text prompt for every stem (default: empty)")
    a = sub.add_parser("accompany", help="stems for the songs of a dataset (train.py's held-out ones, or all), scored against the songs")
    add_model_options(a)
    a.add_argument("--data", required=True, help="dataset folder (the layouts train.py reads)")
    a.add_argument("--target", required=True, help="stem to generate: drums, bass, ...")
    a.add_argument("--split", default="held-out", choices=SPLITS, help="held-out: the songs train.py holds "
                   "out of --data; all: every song of --data (a sealed set's own folder, which no run trained on)")
    a.add_argument("--songs", type=int, default=None, help="at most this many songs (default: all)")
    a.add_argument("--seconds", type=float, default=10.0, help="window per song (past 14.98 s only for a model that "
                   "generates in windows, e.g. the toy: --seconds 60 scores whole 60 s songs)")
    a.add_argument("--prompt", default=None, help="text prompt (default: each song's caption.txt, else empty)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed")
    c = sub.add_parser("context", help="stems for any recordings as contexts, scored against the beats tracked on them")
    add_model_options(c)
    c.add_argument("--audio", required=True, help="an audio file, or a folder: its .wav, .flac and .mp3 files, sorted")
    c.add_argument("--target", default="drums", help="stem to generate: drums, bass, ...")
    c.add_argument("--seconds", type=float, default=10.0, help="the first seconds of each file (a shorter file: all of it)")
    c.add_argument("--prompt", default="", help="text prompt where a file has no NAME-desc.txt or NAME.txt beside it (default: empty)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p.parse_args(argv)


# ---- checks that need no model ------------------------------------------------------------------
def parse_bpms(text: str) -> list[float]:
    bpms = []
    for item in text.split(","):
        try:
            bpm = float(item)
        except ValueError:
            raise EvalError(f"--bpm: {item.strip()!r} is not a number (want e.g. 100,120,140)") from None
        if not (0 < bpm <= MAX_BPM):
            raise EvalError(f"--bpm: every tempo must be > 0 and at most {MAX_BPM:g}, got {item.strip()}")
        bpms.append(bpm)
    return bpms


def parse_meters(text: str) -> list[int]:
    meters = []
    for item in text.split(","):
        try:
            meter = int(item)
        except ValueError:
            raise EvalError(f"--meter: {item.strip()!r} is not a whole number (want e.g. 3,4,5)") from None
        if not 1 <= meter <= MAX_METER:
            raise EvalError(f"--meter: every meter must be 1 to {MAX_METER} beats a bar, got {item.strip()}")
        if meter in meters:
            raise EvalError(f"--meter: {meter} is given twice")
        meters.append(meter)
    return meters


def check_common(args):
    check_sampling(args)  # before the model loads; its own settings fill the rest
    check_seconds(args.seconds)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    if importlib.util.find_spec("matplotlib") is None:
        raise EvalError("report.png needs matplotlib: pip install -e .[eval]")
    if args.tracker == "beat_this" and importlib.util.find_spec("beat_this") is None:
        raise EvalError("the beat_this tracker is not installed: pip install beat-this")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {out}: cannot create it ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise EvalError(f"--out {out} is not writable")


def pick_device(name):
    import torch

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError("--device cuda asked for, but no CUDA device is available")
    return device


def load_model(args):
    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(args.model, device=pick_device(args.device), stage=True, t5=args.t5)
    if model.context_token_added:
        print(f"warning: {args.model} is a plain MusicGen, not a STAGE model: its context token is untrained, "
              "so its stems cannot follow a context", file=sys.stderr)
    return model


# ---- the four commands --------------------------------------------------------------------------
def run_beats(args):
    from stage_min.eval import evaluation as E

    if (args.bpm is None) == (args.beats is None):
        raise EvalError("give the reference as --bpm or as --beats, one of them")
    if args.bpm is not None and not (0 < args.bpm <= MAX_BPM):
        raise EvalError(f"--bpm must be > 0 and at most {MAX_BPM:g}, got {args.bpm:g}")
    if not (args.offset >= 0 and np.isfinite(args.offset)):
        raise EvalError(f"--offset must be >= 0, got {args.offset:g}")
    if args.beats is not None:  # read before the audio: a bad reference fails fast
        from stage_min.io.loading import LoadError, read_small
        from stage_min.train.data import parse_beats

        if not os.path.lexists(args.beats):
            raise EvalError(f"--beats {args.beats}: No such file")
        try:
            reference = parse_beats(read_small(Path(args.beats), MAX_BEATS_BYTES).decode("utf-8"))[0]
        except LoadError as e:
            raise EvalError(f"--beats: {e}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise EvalError(f"--beats {args.beats}: {e}") from None
    audio = load_audio(args.audio, SAMPLE_RATE)
    seconds = len(audio) / SAMPLE_RATE
    if args.beats is None:
        from stage_min.io.metronome import beat_times

        if args.offset >= seconds:
            raise EvalError(f"--offset {args.offset:g} s is not before the end of {args.audio} ({seconds:.2f} s): "
                            "no reference beat would be scored")
        reference = beat_times(args.bpm, seconds, args.offset)
    elif not len(reference) or reference[0] >= seconds:
        raise EvalError(f"--beats {args.beats}: no beat before the end of {args.audio} ({seconds:.2f} s): nothing to score")
    scores = E.beat_scores(audio, SAMPLE_RATE, reference, args.tracker)
    line = {"audio": args.audio, "tracker": args.tracker, **scores, "beats": [round(float(t), 3) for t in scores["beats"]]}
    print(json.dumps(E.jsonable(line)))


def run_tempo(args):
    from stage_min.eval import evaluation as E

    bpms, meters = parse_bpms(args.bpm), parse_meters(args.meter)
    if args.seeds < 1:
        raise EvalError(f"--seeds must be >= 1, got {args.seeds}")
    if not 0 <= args.first_seed <= 2**63 - 1 - args.seeds:
        raise EvalError(f"--first-seed must be in [0, 2^63 - 1 - --seeds], got {args.first_seed}")
    check_common(args)
    model = load_model(args)
    sampling = model.sampling_with(**sampling_given(args))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    results = E.tempo_experiment(model, bpms, seeds, args.seconds, args.prompt, args.out, sampling,
                                 args.tracker, args.batch_size, meters=meters)
    per_meter = "".join(f"; {m['meter']} beats a bar: {m['f_measure']:.3f} / {m['f_measure_nocontext']:.3f}"
                        for m in results["per_meter"]) if len(meters) > 1 else ""
    finish({"model": args.model, "sampling": asdict(sampling), **results}, args.out,
           f"beat F-measure {results['mean']:.3f} with the click track, {results['mean_nocontext']:.3f} without" + per_meter)


def run_accompany(args):
    from stage_min.eval import evaluation as E

    if args.songs is not None and args.songs < 1:
        raise EvalError(f"--songs must be >= 1, got {args.songs}")
    check_common(args)
    # the held-out split is the one recorded in the model's run folder; a sealed set (--split all) needs none
    val_fraction, split_seed = E.train_split(args.model) if args.split == "held-out" else (0.0, 0)
    E.eval_songs(args.data, args.target.lower(), args.split, val_fraction, split_seed)  # a bad --data fails before the model loads
    model = load_model(args)
    sampling = model.sampling_with(**sampling_given(args))
    results = E.accompany_experiment(model, args.data, args.target.lower(), args.out, args.songs, args.seconds, args.prompt,
                                     sampling, args.seed, args.tracker, args.batch_size, val_fraction, split_seed,
                                     split=args.split)
    finish({"model": args.model, "data": str(args.data), "sampling": asdict(sampling), **results}, args.out,
           f"beat F-measure {results['mean']:.3f} with the context, {results['mean_nocontext']:.3f} without, "
           f"{results['mean_reference']:.3f} for the reference stems; fad_encodec {results['fad_encodec']:.4g} "
           f"(without context {results['fad_encodec_nocontext']:.4g}), kad_encodec {results['kad_encodec']:.4g} "
           f"(without context {results['kad_encodec_nocontext']:.4g})" + pitch_summary(results))


def run_context(args):
    from stage_min.eval import evaluation as E

    check_common(args)
    files = E.probe_files(args.audio)  # a bad --audio fails before the model loads
    model = load_model(args)
    sampling = model.sampling_with(**sampling_given(args))
    results = E.context_experiment(model, files, args.target.lower(), args.out, args.seconds, args.prompt, sampling,
                                   args.seed, args.tracker, args.batch_size)
    finish({"model": args.model, "audio": str(args.audio), "sampling": asdict(sampling), **results}, args.out,
           f"beat F-measure {results['mean']:.3f} with the context, {results['mean_nocontext']:.3f} without "
           f"(against the beats tracked on each file)" + pitch_summary(results))


def pitch_summary(results) -> str:
    if "mean_pitch_agreement" not in results:
        return ""
    line = f"; pitch agreement {results['mean_pitch_agreement']:.3f} with the context, {results['mean_pitch_agreement_nocontext']:.3f} without"
    return line + (f", {results['mean_pitch_agreement_reference']:.3f} for the reference stems"
                   if "mean_pitch_agreement_reference" in results else "")


def finish(results, out, summary):
    from stage_min.eval import evaluation as E

    written = E.write_results(results, out) + [E.write_report(results, out)]
    print(summary)
    print("wrote " + ", ".join(str(p) for p in written) + f" and {len(results['rows'])} row(s) of audio in {Path(out) / 'audio'}")


def main(argv=None):
    args = parse_args(argv)
    try:
        with warnings_via_tqdm():  # a warning goes above the progress bar, not onto its line
            {"beats": run_beats, "tempo": run_tempo, "accompany": run_accompany, "context": run_context}[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # every failure a user can cause ends in one line, never a traceback
        from stage_min.train.data import DataError
        from stage_min.io.loading import LoadError

        if not isinstance(e, (EvalError, DataError, LoadError, AudioError, ValueError, OSError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
