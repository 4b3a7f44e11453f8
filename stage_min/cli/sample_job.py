"""sample.py's work, so that the script stays arguments in, library calls out (and tests can call each step):
which mode the options ask for, every check that needs no audio or model (bad input fails at once, in one
line), where each output goes, reading the context, loading the models, generating, writing.

Modes: a whole song or click track (songs.py's windows; a stem exactly as long), a folder of songs, or one
window (text alone, or a --duration stem next to a context's start). Imports are inside the functions, so
that `sample.py --help` and a Ctrl-C during start-up stay instant.
"""
import math
import os
import re
import sys
from pathlib import Path

from .options import check_sampling, sampling_given

SAMPLE_RATE = 32000  # EnCodec 32 kHz, MusicGen's codec
FRAME_RATE = 50
HOP = SAMPLE_RATE // FRAME_RATE
TOY_MODEL = Path(__file__).resolve().parents[2] / "weights" / "stage-toy"
MAX_FRAMES = 1500  # MusicGen was trained on 30 s windows: the context, the separator and the stem share them
MAX_BPM = 1000.0  # faster than any music; a limit also keeps the click track's size sane
MAX_CLICK_SECONDS = 3600.0  # a click track is made in memory before it is accompanied
MAX_SEED = 2**63 - 1
WHOLE_CONTEXT_SECONDS = 10.0  # --whole-context without --duration: the original's fixed 10 s stem



# ---- modes ---------------------------------------------------------------------------------------
def windowed(args) -> bool:
    """Whole songs (songs.py): a stem exactly as long as the context or click track, in windows when
    it is long. Otherwise one window: text alone, a --duration stem next to a context's start, or
    (--whole-context) one stem on the whole context."""
    return not args.whole_context and (args.bpm is not None or (args.context is not None and args.duration is None))


def folder_mode(args) -> bool:
    return bool(args.context) and Path(args.context).is_dir()


def stem_models(args) -> dict:
    """Stem name -> model path (None: the shipped toy model). Without --stems, one stem called "stem"
    (written to --out itself)."""
    if not args.stems:
        given = args.model or [None]
        if len(given) > 1:
            raise ValueError("--model given more than once: name each with --stems and --model NAME=PATH")
        return {"stem": given[0]}
    names = [n.strip() for n in args.stems.split(",")]
    if "" in names or len(set(names)) != len(names) or "mix" in names:
        raise ValueError(f"--stems must be distinct names separated by commas (not 'mix'), got {args.stems!r}")
    models = {}
    for item in args.model or []:
        name, _, path = item.partition("=")
        if name not in names or not path:
            raise ValueError(f"--model {item}: with --stems, give --model NAME=PATH for NAME in {','.join(names)}")
        models[name] = path
    missing = [n for n in names if n not in models]
    if missing:
        raise ValueError(f"no model for stem {missing[0]}: give --model {missing[0]}=PATH")
    return {n: models[n] for n in names}


# ---- output paths --------------------------------------------------------------------------------
def output_paths(out, names: list, mix_out=None, name_stem: bool = False) -> tuple[dict, Path | None]:
    """({stem: path}, path of the mix or None). One stem goes to OUT itself (its mix to --mix-out, if
    given); a stack writes OUT_NAME.wav per stem and the full mix to --mix-out or OUT_mix.wav.
    name_stem (folder mode, OUT named after the song): one stem is OUT_stem.wav, never the song's own name."""
    out = Path(out)
    if names == ["stem"] and not name_stem:
        return {"stem": out}, mix_out and Path(mix_out)
    suffix = out.suffix or ".wav"
    stems = {n: out.with_name(f"{out.stem}_{n}{suffix}") for n in names}
    return stems, None if names == ["stem"] else Path(mix_out or out.with_name(f"{out.stem}_mix{suffix}"))


def labelled_outputs(names: list, out, mix_out=None, name_stem: bool = False) -> dict:
    """{what it is (for messages): path} of every file one song writes (output_paths)."""
    stems, mix = output_paths(out, names, mix_out, name_stem)
    labelled = {("--out" if name == "stem" else f"the {name} stem"): path for name, path in stems.items()}
    if mix:
        labelled["--mix-out" if mix_out else "the mix"] = mix
    return labelled


def folder_files(folder) -> list:
    from stage_min.train.data import AUDIO_EXTS

    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in AUDIO_EXTS)


def folder_outputs(files: list, out) -> dict:
    """{song file: the name its outputs start from in the --out folder} (output_paths with name_stem:
    a.wav -> a_stem.wav, or a_drums.wav, a_bass.wav, a_mix.wav); songs of the same name with different
    extensions get distinct outputs (a.wav -> a_wav_stem.wav, a.flac -> a_flac_stem.wav)."""
    names = [f.stem for f in files]
    return {f: Path(out) / (f"{f.stem}.wav" if names.count(f.stem) == 1 else f"{f.stem}_{f.suffix[1:]}.wav") for f in files}


def file_ids(paths: dict) -> dict:
    """{(device, inode): what} of existing input files, to find an output that would replace one
    (a symlink or a hard link to it included)."""
    ids = {}
    for what, path in paths.items():
        try:
            st = os.stat(path)
        except (OSError, TypeError):  # not there (or not given: None)
            continue
        ids[(st.st_dev, st.st_ino)] = what
    return ids


def check_outputs(outputs: dict, inputs: dict, overwrite: bool):
    """Every output writable in a format we write, no two the same file, none an input (unless
    --overwrite). outputs: {what: path}; inputs: file_ids() of the input files."""
    from stage_min.io.audio import check_writable, same_file

    done = []
    for what, path in outputs.items():
        check_writable(path)
        for other, earlier in done:
            if same_file(path, earlier):
                raise ValueError(f"{what} and {other} are the same file ({path}): one would replace the other")
        done.append((what, path))
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there yet: it cannot be an input
        if (st.st_dev, st.st_ino) in inputs and not overwrite:
            raise ValueError(f"{what} {path} is the {inputs[(st.st_dev, st.st_ino)]} file: it would be overwritten "
                             "(choose another name, or pass --overwrite)")


# ---- checks --------------------------------------------------------------------------------------
def stem_seconds_limit(args) -> float:
    """The longest one-window stem: all of the window for text, less the separator (and at least
    one context frame) next to a context."""
    return (MAX_FRAMES - 2 if args.context else MAX_FRAMES) / FRAME_RATE


def check_numbers(args):
    """Numbers in range and finite (NaN passes no comparison, inf would pass some)."""
    check_sampling(args)
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    if args.duration is not None:
        if not (args.duration > 0 and math.isfinite(args.duration)):
            raise ValueError(f"--duration must be > 0 seconds and finite, got {args.duration:g}")
        if not windowed(args) and args.duration > stem_seconds_limit(args):
            where = " with a context" if args.context else " for text alone"
            raise ValueError(f"--duration at most {stem_seconds_limit(args):g} s{where}, got {args.duration:g}")
    if args.bpm is not None and not (0 < args.bpm <= MAX_BPM):
        raise ValueError(f"--bpm must be > 0 and at most {MAX_BPM:g}, got {args.bpm:g}")
    if args.beats_per_bar < 1:
        raise ValueError(f"--beats-per-bar must be >= 1, got {args.beats_per_bar}")
    if not (args.offset >= 0 and math.isfinite(args.offset)):
        raise ValueError(f"--offset must be a finite number >= 0 (seconds), got {args.offset:g}")
    if not (args.overlap >= 0 and math.isfinite(args.overlap)):
        raise ValueError(f"--overlap must be >= 0 and finite, got {args.overlap:g}")
    if not math.isfinite(args.window):
        raise ValueError(f"--window must be a finite number of seconds, got {args.window:g}")
    if not round(args.window * FRAME_RATE) > round(args.overlap * FRAME_RATE):
        raise ValueError(f"--window must be longer than --overlap, got {args.window:g} and {args.overlap:g} s")
    if 2 * round(args.window * FRAME_RATE) + 1 > MAX_FRAMES:
        raise ValueError(f"--window at most {(MAX_FRAMES - 1) // 2 / FRAME_RATE:g} s (context + stem share 30 s), got {args.window:g}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device or "cpu"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")


def check_modes(args):
    """Which options go together."""
    if args.context and args.bpm is not None:
        raise ValueError("give --context or --bpm, not both")
    if args.bpm is not None:
        if args.duration is None:
            raise ValueError("--bpm needs --duration (there is no context to take the length from)")
        if args.duration < 1 / FRAME_RATE:
            raise ValueError(f"--duration must be at least {1 / FRAME_RATE:g} s (one codec frame) with --bpm, got {args.duration:g}")
        if args.duration > MAX_CLICK_SECONDS:
            raise ValueError(f"--duration at most {MAX_CLICK_SECONDS:g} s with --bpm, got {args.duration:g}")
        if args.offset >= args.duration:
            raise ValueError(f"--offset {args.offset:g} s is not before the end of the click track (--duration "
                             f"{args.duration:g} s): it would hold no click")
    if args.whole_context and (not args.context or args.bpm is not None or args.stems or args.continuation or folder_mode(args)):
        raise ValueError("--whole-context makes one stem over one --context file: not with --bpm, --stems, --continue or a folder")
    if args.mix_out and not (args.context or args.bpm is not None):
        raise ValueError("--mix-out needs --context or --bpm")
    stacked = bool(args.stems)
    if (stacked or args.continuation) and not windowed(args):
        raise ValueError("--stems and --continue need --context or --bpm, and make stems as long as the context: drop --duration")
    if args.continuation and stacked:
        raise ValueError("--continue continues one stem: not with --stems")
    if folder_mode(args) and (args.continuation or args.mix_out or args.duration is not None):
        raise ValueError(f"--context {args.context} is a folder: every song in it is accompanied whole, so "
                         "--duration, --mix-out and --continue are not available")


def check_folder_outputs(args):
    """--out is a folder (made if it is not there): writable, and no output replaces a song."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out}: with a --context folder, --out is a folder")
    if out.is_dir() and os.path.samefile(out, args.context):
        raise ValueError(f"--out {args.out} is the --context folder: the stems would be taken for songs next time; "
                         "choose another folder")
    folder = out if out.is_dir() else out.parent  # --out, or where it is made
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {args.out}: {folder} does not exist or is not writable")
    files = folder_files(args.context)
    if not files:
        raise ValueError(f"{args.context}: no audio files (.wav, .flac, .ogg, .mp3, .aif, .aiff) in this folder")
    if out.is_dir():  # outputs may already be there
        inputs = file_ids({f"--context folder's {f.name}": f for f in files})
        for path in folder_outputs(files, out).values():
            check_outputs(labelled_outputs(list(args.stem_models), path, name_stem=True), inputs, args.overwrite)


def caption(args):
    """--genres/--moods -> the official STAGE caption in args.prompt, for every mode (one stem,
    stacks, folders); said on stderr, so that the text the model sees is never a guess."""
    if args.genres is None and args.moods is None:
        return
    if args.prompt:
        raise ValueError("give --prompt (free text) or --genres/--moods (the STAGE caption form), not both")
    from stage_min.train.captions import stage_caption

    args.prompt = stage_caption(args.genres, args.moods)
    print(f"caption: {args.prompt!r}", file=sys.stderr)


def check_options(args):
    """Everything that can be checked without reading audio or loading a model, so that bad input
    fails at once."""
    from stage_min.io.audio import check_input_file

    check_numbers(args)
    check_modes(args)
    caption(args)
    args.stem_models = stem_models(args)
    if args.continuation:
        check_input_file(args.continuation)
    if folder_mode(args):
        return check_folder_outputs(args)
    if args.context:
        check_input_file(args.context)  # a FIFO, a folder, a symlink loop: refused before it is opened
    inputs = file_ids({"--context": args.context, "--continue": args.continuation})
    check_outputs(labelled_outputs(list(args.stem_models), args.out, args.mix_out), inputs, args.overwrite)


# ---- audio in ------------------------------------------------------------------------------------
def read_song(path, max_seconds=None):
    """Mono 32 kHz audio, checked to be long enough and not silent. max_seconds: a partial read."""
    import numpy as np

    from stage_min.io.audio import AudioError, load_audio

    audio = load_audio(path, SAMPLE_RATE, max_seconds=max_seconds)
    if len(audio) < HOP:
        raise AudioError(f"{path}: too short: {len(audio)} samples at {SAMPLE_RATE} Hz "
                         f"({len(audio) / SAMPLE_RATE * 1000:.2f} ms); the model needs at least {HOP} samples (one 20 ms frame)")
    if np.abs(audio).max() < 1e-4:
        raise AudioError(f"{path}: the audio is silent")
    return audio


def read_context(args):
    """(context as mono 32 kHz audio, or None for text alone; the whole context's length in frames).
    A whole song is read whole; for a one-window stem only the part the model or the mix can use."""
    if args.context and (windowed(args) or args.whole_context):
        audio = read_song(args.context)
        return audio, len(audio) // HOP
    if args.context:
        from stage_min.io.audio import audio_seconds

        total = int(audio_seconds(args.context) * SAMPLE_RATE) // HOP
        audio = read_song(args.context, max_seconds=args.duration + 2 / FRAME_RATE)
        return audio, max(total, len(audio) // HOP)
    if args.bpm is not None:
        from stage_min.io.metronome import metronome

        audio = metronome(args.bpm, args.duration, args.beats_per_bar, args.offset, SAMPLE_RATE)
        return audio, len(audio) // HOP
    return None, 0


def context_cut_notice(total_frames: int, kept_frames: int, stem_frames: int, frame_rate: float) -> str | None:
    """The stderr line for a context cut to `kept_frames` of its `total_frames` (None when nothing is
    cut): any cut, not only one forced by the model's window, since the original would have taken it all."""
    if kept_frames >= total_frames:
        return None
    return (f"note: the context is {total_frames / frame_rate:.2f} s; kept its first {kept_frames / frame_rate:.2f} s "
            f"for a {stem_frames / frame_rate:.2f} s stem (the original STAGE conditions one stem on the whole context; "
            f"sample.py --whole-context keeps all of it)")


def plan_frames(args, context, total_frames: int) -> tuple[int, int]:
    """One window: (stem frames, context frames), cutting the context to what the model can take.
    total_frames: the whole context's length (only its first part may have been read)."""
    if context is None:
        seconds = 5.0 if args.duration is None else args.duration
        return max(1, round(seconds * FRAME_RATE)), 0
    n_frames = max(1, round((WHOLE_CONTEXT_SECONDS if args.duration is None else args.duration) * FRAME_RATE))
    if args.whole_context:
        return n_frames, len(context) // HOP
    kept = min(len(context) // HOP, n_frames, MAX_FRAMES - 1 - n_frames)
    note = context_cut_notice(total_frames, kept, n_frames, FRAME_RATE)
    if note:
        print(note, file=sys.stderr)
    return n_frames, kept


# ---- models --------------------------------------------------------------------------------------
def pick_device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_path(path) -> str:
    """The path as given, or (None) the shipped toy model, said in one line."""
    if path is not None:
        return path
    if not (TOY_MODEL / "config.json").exists():
        raise ValueError(f"the toy model is missing from {TOY_MODEL}: rebuild it with "
                         "`python -m stage_min.toy weights/stage-toy`, or pass --model")
    print(f"using the toy STAGE drums model in {TOY_MODEL} (synthetic drums, trained on a CPU); "
          "pass --model for real music, e.g. a STAGE checkpoint or facebook/musicgen-small", file=sys.stderr)
    return str(TOY_MODEL)


def load_models(args, stage: bool = True) -> dict:
    """Stem name -> MusicGen, every model loaded before any generation (a bad path fails at once)."""
    import torch

    from stage_min.io.pretrained import from_pretrained

    device = pick_device(args)
    models = {}
    for name, path in args.stem_models.items():
        path = model_path(path)
        model = from_pretrained(path, device=device, dtype=getattr(torch, args.dtype), stage=stage, t5=args.t5)
        if stage and model.context_token_added:
            print(f"warning: {path} is a plain MusicGen, not a STAGE model: its context token is untrained, "
                  "so the stem will not follow the context", file=sys.stderr)
        model.sampling = model.sampling_with(**sampling_given(args))  # the options given replace its own settings
        models[name] = model
    return models


# ---- audio out -----------------------------------------------------------------------------------
def write_outputs(paths: dict, stems: dict, mix_path, mix, interrupted, sample_rate=SAMPLE_RATE):
    """Each stem to its path, then the mix; nothing is written if any of them is not finite, and
    nothing after a Ctrl-C (even one a library swallowed)."""
    import numpy as np

    from stage_min.io.audio import save_audio

    stems = {name: np.asarray(audio, dtype=np.float32) for name, audio in stems.items()}
    mix = None if mix is None else np.asarray(mix, dtype=np.float32)
    if not all(np.isfinite(a).all() for a in [*stems.values(), *([] if mix is None else [mix])]):
        raise ValueError("the generated audio holds NaN or infinite values; nothing was written")
    outputs = [(path, stems[name], f"{len(stems[name]) / sample_rate:.2f} s at {sample_rate} Hz") for name, path in paths.items()]
    if mix_path:
        what = " + ".join(paths) if len(paths) > 1 else "stem"
        outputs.append((mix_path, mix, f"context + {what}, {len(mix) / sample_rate:.2f} s"))
    for path, samples, what in outputs:
        if interrupted:
            raise KeyboardInterrupt
        save_audio(path, samples, sample_rate)
        print(f"wrote {path}: {what}")


# ---- generation ----------------------------------------------------------------------------------
def song_options(args) -> dict:
    return dict(window_s=args.window, overlap_s=args.overlap, sampling=None, seed=args.seed,  # each model's own (load_models)
                progress=True, compile=args.compile)


def accompany(models: dict, songs: list, args, continuations=None) -> list:
    """Per song ({stem: audio}, mix): one stem, or a stack of them (songs.py)."""
    from stage_min import songs as whole
    from stage_min.io.audio import mix

    prompts = [args.prompt] * len(songs)
    if list(models) != ["stem"]:
        stacks = whole.stack_songs(models, songs, prompts, **song_options(args))
        stems = [{name: audio.numpy() for name, audio in stack.items()} for stack, _ in stacks]
    else:
        out = whole.accompany_songs(models["stem"], songs, prompts, continuations=continuations, **song_options(args))
        stems = [{"stem": audio.numpy()} for audio, _ in out]
    return [(parts, mix(song, parts, SAMPLE_RATE)) for song, parts in zip(songs, stems)]  # level-matched (io/audio.py)


def run_song(args, context, interrupted):
    """A stem (or a stack) exactly as long as the context or click track, however long."""
    from stage_min.io.audio import AudioError, load_audio

    continuation = None
    if args.continuation:
        continuation = load_audio(args.continuation, SAMPLE_RATE)
        if len(continuation) < HOP:
            raise AudioError(f"{args.continuation}: too short to continue (at least 20 ms)")
    models = load_models(args)
    [(stems, mix)] = accompany(models, [context], args, [continuation])
    paths, mix_path = output_paths(args.out, list(models), args.mix_out)
    write_outputs(paths, stems, mix_path, mix, interrupted)


def run_folder(args, interrupted):
    """Every audio file of the --context folder, --batch songs at a time; unreadable files skipped."""
    import soundfile as sf

    from stage_min.io.audio import AudioError

    outputs = folder_outputs(folder_files(args.context), args.out)
    files, skipped = [], 0
    for f in outputs:
        try:
            sf.info(str(f))
            files.append(f)
        except Exception:
            skipped += 1
            print(f"warning: skipping {f}: cannot read audio", file=sys.stderr)
    if not files:
        raise AudioError(f"{args.context}: none of its audio files can be read")
    models = load_models(args)
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    done = 0
    for i in range(0, len(files), args.batch):
        batch, songs = [], []
        for f in files[i:i + args.batch]:
            try:
                songs.append(read_song(f))
                batch.append(f)
            except AudioError as e:
                skipped += 1
                print(f"warning: skipping {e}", file=sys.stderr)
        for f, (stems, mix) in zip(batch, accompany(models, songs, args) if songs else []):
            paths, mix_path = output_paths(outputs[f], list(models), name_stem=True)
            write_outputs(paths, stems, mix_path, mix, interrupted)
            done += 1
    print(f"{done} song(s) accompanied into {out}; {skipped} unreadable file(s) skipped")


def run_window(args, context, total_frames, interrupted):
    """One window: text alone, or a --duration stem next to the context's start."""
    import torch

    model = load_models(args, stage=context is not None)["stem"]  # first: a bad model is the one line said
    n_frames, context_frames = plan_frames(args, context, total_frames)
    sampling = model.sampling
    if context is None:
        audio, _ = model.generate([args.prompt], n_frames, sampling, seed=args.seed, progress=True, compile=args.compile)
    else:
        audio, _ = model.accompany([torch.from_numpy(context[: context_frames * HOP])], [args.prompt], n_frames,
                                   sampling, seed=args.seed, progress=True, compile=args.compile,
                                   whole_context=args.whole_context)
    stem = audio[0, 0].float().cpu().numpy()
    from stage_min.io.audio import mix as level_matched

    mix = level_matched(context, {"stem": stem}, model.sample_rate) if args.mix_out else None
    write_outputs({"stem": Path(args.out)}, {"stem": stem}, args.mix_out, mix, interrupted, model.sample_rate)


def run(args, interrupted):
    check_options(args)
    if folder_mode(args):
        return run_folder(args, interrupted)
    context, total_frames = read_context(args)
    if context is not None and windowed(args):
        return run_song(args, context, interrupted)
    return run_window(args, context, total_frames, interrupted)
