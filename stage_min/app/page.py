"""The web demo's page and what its button does (app.py only parses options and starts the server).

Built on gradio: maintained, made for exactly this kind of page (audio in, audio out, a job queue,
progress bars), and what audiocraft's own MusicGen demo uses. Everything stays on this machine:
the server listens on 127.0.0.1 unless told otherwise, and gradio's telemetry and version check
are switched off before it is imported.
"""
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # also turns off gradio's version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from ..train.captions import stage_caption  # noqa: E402
from ..io.audio import AudioError, load_audio, mix, save_audio  # noqa: E402
from ..io.loading import LoadError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "weights/stage-toy"  # the shipped toy STAGE model (drums; 2 s windows)
BASS_TOY = "weights/stage-toy-bass"  # the shipped toy bass model, stacked in the page's example
EXAMPLE_SONG = "weights/examples/chords-only.ogg"  # 12 s of piano chords, 118 BPM: drums, then bass, over it
DEFAULT_ROOTS = ("weights", "runs")  # the folders models are loaded from (app.py --model-root adds more)
SAMPLE_RATE = 32000  # EnCodec 32 kHz
FRAME_RATE = 50
MAX_CLICK_SECONDS = 600.0  # a click track's length (a song is used whole, up to MAX_SONG_SECONDS)
MAX_SONG_SECONDS = 1200.0  # 20 minutes: longer uploads are refused before they are read
MAX_STACK = 3  # stems stacked after the first (each has its own player)
WINDOW_S, OVERLAP_S = 10.0, 5.0  # sample.py's --window and --overlap defaults (a fixed-window model uses its own)
MAX_SEED = 2**63 - 1


# ---- inputs -------------------------------------------------------------------------------------
class PageError(gr.Error):
    """A message for the page, in one line, and nothing in the server's log: a bad input is not a fault
    of the server (gradio prints a traceback for every other gr.Error). A bug's details are logged
    once, by Generator.__call__."""

    def __init__(self, message: str, **kwargs):
        super().__init__(message, print_exception=False, **kwargs)


def build_prompt(genres: str, moods: str, text: str) -> str:
    """The official STAGE models' caption form (captions.stage_caption: `Genres: a, b. Mood: x. `), then
    any free text. A box with no item adds no part; `;` separates items as `,` does."""
    def items(value):
        value = (value or "").replace(";", ",")
        return value if value.replace(",", "").strip() else None

    return stage_caption(items(genres), items(moods)) + (text or "").strip()


@dataclass
class Request:
    """One click of Generate, checked: everything the generation needs, nothing read yet."""
    song: str | None  # uploaded audio file, or None for a click track
    bpm: float | None
    beats_per_bar: int
    prompt: str
    model: str
    seconds: float
    guidance: float
    top_k: int
    temperature: float
    seed: int | None
    stack: tuple = ()  # ((stem name, model), ...) made after the first stem, each over the song and the stems before it
    name: str = "stem"  # the first stem's name (its file is NAME.wav)


def stem_name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 40 and name.replace("_", "").replace("-", "").isalnum() and name.isascii()


def parse_stack(text: str, first: str = "stem") -> tuple[tuple[str, str], ...]:
    """`bass=runs/bass, keys=PATH` -> [(name, model)]; a bad entry raises gr.Error."""
    stems = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, model = (x.strip() for x in item.partition("="))
        if not model or not stem_name_ok(name):
            raise PageError(f"Stack: write each stem as name=model, comma separated (bass=runs/bass), got '{item.strip()}'.")
        if name.lower() in ("mix", first.lower()) or name.lower() in [n.lower() for n, _ in stems]:
            raise PageError(f"Stack: the stem name '{name}' is used twice or names another output ({first}, mix).")
        stems.append((name, model))
    if len(stems) > MAX_STACK:
        raise PageError(f"Stack: at most {MAX_STACK} stems after the first, got {len(stems)}.")
    return tuple(stems)


def number(value, what: str, low: float, high: float, whole: bool = False, unit: str = ""):
    """A finite number in [low, high] (a whole one when asked), else gr.Error naming the field; never
    an OverflowError from int(1e30) or int(inf)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
    if ok and whole and value != int(value):
        ok = False
    if not ok:
        shown = f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
        kind = "a whole number" if whole else "a number"
        raise PageError(f"{what} must be {kind} from {low:g} to {high:g}{unit}, got {shown}.")
    return int(value) if whole else float(value)


def check_request(song, bpm, beats_per_bar, prompt, model, seconds, guidance, top_k, temperature, seed, stack="",
                  name="stem") -> Request:
    """Every input that can be checked before loading anything; a bad one raises gr.Error (a message
    in the page). The same rules as sample.py's options."""
    from ..generate import SamplingConfig

    bpm = bpm or None  # the field shows 0 when empty: no click track
    seed = None if seed is None or seed == -1 else seed
    if not song and bpm is None:
        raise PageError("Give a song to accompany (upload one) or a tempo in BPM for a click track.")
    if song and bpm is not None:
        raise PageError("Give a song or a tempo, not both: clear the BPM field to accompany the song.")
    if bpm is not None and not (isinstance(bpm, (int, float)) and 20 <= bpm <= 400):
        raise PageError(f"The tempo must be between 20 and 400 BPM, got {bpm:g}.")
    beats_per_bar = number(beats_per_bar, "Beats per bar", 1, 16, whole=True)
    if song is None:  # the click track's length; a song is used whole
        seconds = number(seconds, "The click track's length", 0.1, MAX_CLICK_SECONDS, unit=" seconds")
    top_k = number(top_k, "Top-k (0 turns it off)", 0, 1 << 20, whole=True)
    if seed is not None:
        seed = number(seed, "The seed (-1 for a random one)", 0, MAX_SEED, whole=True)
    if not (model or "").strip():
        raise PageError("Choose a model: a STAGE model folder or checkpoint file.")
    name = (name or "").strip() or "stem"
    if not stem_name_ok(name) or name.lower() == "mix":
        raise PageError(f"The stem's name names its file: letters, digits, - and _ (not 'mix'), got '{name}'.")
    try:
        SamplingConfig(cfg_coef=guidance, top_k=top_k, temperature=temperature).check()
    except (ValueError, TypeError) as e:
        raise PageError(f"Sampling settings: {e}.") from None
    return Request(song, bpm, beats_per_bar, prompt, model.strip(), float(seconds or 0), float(guidance), top_k,
                   float(temperature), seed, parse_stack(stack, name), name)


def model_roots(extra=()) -> tuple[Path, ...]:
    """The folders this page loads models from: weights/ and runs/ (of the repository, and of the
    current folder when it is another), and each --model-root, resolved (symlinks followed)."""
    roots = [base / name for base in dict.fromkeys((ROOT, Path.cwd())) for name in DEFAULT_ROOTS]
    roots += [Path(r).expanduser() for r in extra]
    return tuple(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))


def roots_text(roots) -> str:
    shown = []
    for r in roots:
        try:
            shown.append(f"{r.relative_to(Path.cwd())}/")
        except ValueError:
            shown.append(f"{r}/")
    return ", ".join(shown)


def model_location(name: str, roots=None) -> str:
    """The model's real path: a folder or file (relative to the current folder, else to the
    repository) under one of `roots`. Anything else, a path outside them or a hub id, is refused
    in one line: the page never reads the server's other files."""
    roots = model_roots() if roots is None else roots
    name = (name or "").strip()
    candidates = [Path(name).expanduser()] if Path(name).expanduser().is_absolute() else [Path.cwd() / name, ROOT / name]
    for path in candidates:
        real = Path(os.path.realpath(path))
        inside = any(real == r or r in real.parents for r in roots)
        if path.exists() or os.path.lexists(path):
            if not inside:
                break
            if real in roots:
                raise PageError(f"{name} is a models folder itself; choose one model in it.")
            return str(real)
        if inside and real.parent.is_dir():  # under a root but missing
            hint = " Build the shipped toy with `python -m stage_min.toy weights/stage-toy`." if Path(name) == Path(DEFAULT_MODEL) else ""
            raise PageError(f"Model folder {name} not found.{hint}")
    raise PageError(f"Model {name} refused: this page loads only models under {roots_text(roots)} "
                   "(start app.py with --model-root FOLDER to add one).")


def missing_model(name: str, roots=None) -> str:
    """Why the chosen model cannot be used, or "" (shown under the model field as it is chosen)."""
    try:
        model_location(name, roots)
    except gr.Error as e:
        return e.message
    return ""


def model_config(name: str, roots=None) -> dict:
    """The chosen model's config.json (a bounded read of a regular file), {} when there is none to read."""
    from ..io.loading import follow_latest, read_config

    try:
        folder = Path(model_location(name, roots))
        return read_config(follow_latest(folder)) if folder.is_dir() else {}
    except (gr.Error, LoadError, OSError):
        return {}


def model_target(name: str, roots=None) -> str:
    """The instrument a model makes (a train.py run's --target), for the stem's name; else 'drums'
    for the shipped toy, else 'stem'."""
    config = model_config(name, roots)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    target = (train.get("data_cfg") or {}).get("target") if isinstance(train.get("data_cfg"), dict) else None
    if isinstance(target, str) and stem_name_ok(target):
        return target
    return "drums" if Path(name) == Path(DEFAULT_MODEL) else "stem"


def recommended_sampling(name: str, roots=None):
    """The sampling a local model's config.json recommends (the toy's temperature), else the defaults;
    read without loading the model, to fill the Sampling fields."""
    from ..generate import SamplingConfig
    from ..io.pretrained import recommended_sampling as from_config

    try:
        return from_config(model_config(name, roots).get("sampling"), name)
    except LoadError:  # a bad "sampling" section: said when the model is loaded
        return SamplingConfig()


def model_notice(name: str, roots=None) -> str:
    message = missing_model(name, roots)
    if message:
        return f"⚠️ {message}"
    changed = ", ".join(f"{k.replace('cfg_coef', 'guidance').replace('_', '-')} {v:g}"
                        for k, v in recommended_sampling(name, roots).changed().items())
    return f"ℹ️ This model's recommended sampling: {changed} (set under Sampling)." if changed else ""


def upload_error(path, e: Exception) -> str:
    """An AudioError about an uploaded file, with the server's temporary path replaced by the file's name."""
    text = str(e)
    for shown in (str(path), os.path.realpath(path)):
        text = text.replace(f"{shown}: ", "").replace(shown, Path(path).name)
    return text


def read_context(request: Request) -> tuple[np.ndarray, list[str]]:
    """The audio to accompany (mono 32 kHz): the whole song, or the click track; and notes for the page."""
    from ..io.audio import audio_seconds
    from ..io.metronome import metronome

    if request.song is None:
        return metronome(request.bpm, request.seconds, request.beats_per_bar, 0.0, SAMPLE_RATE), []
    name = Path(request.song).name
    try:
        if os.path.isfile(request.song) and os.path.getsize(request.song) == 0:
            raise PageError(f"The song ({name}) is an empty file (0 bytes): upload an audio file.")
        seconds = audio_seconds(request.song)
        if seconds > MAX_SONG_SECONDS:
            raise PageError(f"The song ({name}) is {seconds / 60:.1f} minutes long; this page takes songs of up to "
                           f"{MAX_SONG_SECONDS / 60:g} minutes (sample.py takes any length).")
        audio = load_audio(request.song, SAMPLE_RATE)
    except AudioError as e:
        raise PageError(f"The song ({name}) cannot be used: {upload_error(request.song, e)}.") from None
    if len(audio) < SAMPLE_RATE // FRAME_RATE:
        raise PageError(f"The song ({name}) is too short (less than 20 ms).")
    if np.abs(audio).max() < 1e-4:
        raise PageError(f"The song ({name}) is silent.")
    return audio, []


# ---- models, loaded once each -------------------------------------------------------------------
_models: dict = {}  # (location, t5) -> MusicGen
_models_lock = threading.Lock()


def get_model(location: str, t5: str | None):
    """Load a model once and keep it (keyed by where it came from)."""
    import torch

    from ..io.pretrained import from_pretrained

    with _models_lock:
        key = (location, t5)
        if key not in _models:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            _models[key] = from_pretrained(location, device=device, stage=True, t5=t5)
        return _models[key]


# ---- the Generate button ------------------------------------------------------------------------
@dataclass
class Result:
    stems: list  # [(name, path)]: the first stem, then the stacked ones
    mix: str
    files: list
    summary: str


class Generator:
    """What the Generate button runs: a whole song (or a click track) accompanied window by window,
    as sample.py does (songs.py). Outputs go to a folder of this server's own, one subfolder per
    generation, each named after its stem (drums.wav, bass.wav) and mix.wav."""

    def __init__(self, t5: str | None = None, roots=()):
        self.t5 = t5
        self.roots = model_roots(roots)
        self.out_dir = None  # made at the first generation
        self.count = 0

    def cleanup(self):
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def __call__(self, song, bpm, beats_per_bar, genres, moods, prompt, model, seconds, guidance, top_k, temperature,
                 seed, stack="", name="stem", progress=None) -> Result:
        progress = progress or (lambda *a, **k: None)
        request = check_request(song, bpm, beats_per_bar, build_prompt(genres, moods, prompt), model, seconds, guidance,
                                top_k, temperature, seed, stack, name)
        location = model_location(request.model, self.roots)
        for _, stacked_model in request.stack:
            model_location(stacked_model, self.roots)  # a missing or refused model is said before anything runs
        try:
            return self.generate(request, location, progress)
        except gr.Error:
            raise
        except (LoadError, AudioError, ValueError, OSError) as e:  # bad input found late: its own message
            raise PageError(str(e)) from None
        except Exception as e:  # a bug: the details go to the server's log, the page gets one line
            traceback.print_exc(file=sys.stderr)
            raise PageError(f"Generation failed ({type(e).__name__}: {e}); the server's log has the details.") from None

    def generate(self, request: Request, location: str, progress) -> Result:
        import torch

        from ..generate import SamplingConfig
        from ..songs import accompany_songs

        start = time.perf_counter()
        progress(0.0, desc="reading the input")
        context, notes = read_context(request)
        seconds = len(context) / SAMPLE_RATE
        progress(0.02, desc="loading the model (once)")
        jobs = [(request.name, location, request.model)]
        jobs += [(name, model_location(m, self.roots), m) for name, m in request.stack]
        models = [get_model(loc, self.t5) for _, loc, _ in jobs]
        for (_, _, shown), model in zip(jobs, models):
            if model.context_token_added:
                notes.append(f"{shown} is a plain MusicGen, not a STAGE model: its stem will not follow the song.")
        for note in notes:
            gr.Warning(note)
        sampling = SamplingConfig(cfg_coef=request.guidance, top_k=request.top_k, temperature=request.temperature)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        bed = torch.from_numpy(context.astype(np.float32))
        stems = {}
        for n, ((name, _, _), model) in enumerate(zip(jobs, models)):  # as songs.stack: each stem hears the ones before
            def on_window(r, rows, windows, frames, n=n, name=name):
                done = windows[0][2] / FRAME_RATE
                progress(0.05 + 0.93 * (n + min(1.0, done / max(seconds, 1e-9))) / len(jobs),
                         desc=f"{name}: {min(done, seconds):.0f} of {seconds:.0f} s")
            progress(0.05 + 0.93 * n / len(jobs), desc=f"{name}: 0 of {seconds:.0f} s")
            [(audio, _)] = accompany_songs(model, [bed], [request.prompt], WINDOW_S, OVERLAP_S, None, sampling,
                                           seed + n, on_window=on_window)
            stems[name] = audio.numpy()
            bed = bed + audio
        progress(0.99, desc="mixing and writing the files")
        rate = models[0].sample_rate
        mixed = mix(context, stems, rate)
        self.out_dir = self.out_dir or Path(tempfile.mkdtemp(prefix="stage_min_app_"))
        self.count += 1
        folder = self.out_dir / f"{self.count:04d}"
        folder.mkdir()
        paths = []
        for name, audio in stems.items():
            save_audio(folder / f"{name}.wav", audio, rate)
            paths.append((name, str(folder / f"{name}.wav")))
        save_audio(folder / "mix.wav", mixed, rate)
        source = "the song" if request.song else f"a click track at {request.bpm:g} BPM, {request.beats_per_bar} beats per bar"
        first = stems[request.name]
        summary = (f"Generated {len(first) / rate:.2f} s of stem over {source} in "
                   f"{time.perf_counter() - start:.1f} s (seed {seed}; prompt: \"{request.prompt}\").")
        if len(stems) > 1:
            summary += f" Stacked on it: {', '.join(list(stems)[1:])}."
        summary += " The mix has the song and each stem at the same loudness, under a limiter."
        return Result(paths, str(folder / "mix.wav"), [p for _, p in paths] + [str(folder / "mix.wav")], summary)


# ---- the page -----------------------------------------------------------------------------------
def local_models(roots) -> list[str]:
    """Model folders found in the roots (for the model menu; any other under them can be typed in):
    a folder with a config.json, or a train.py run folder (with a `latest` pointer)."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.is_dir() and ((p / "config.json").is_file() or (p / "latest").is_file()):
                try:
                    found.append(str(p.relative_to(ROOT)))
                except ValueError:
                    found.append(str(p))
    return found


def show_prompt(genres: str, moods: str, text: str) -> str:
    prompt = build_prompt(genres, moods, text)
    return f"Prompt sent to the model: `{prompt}`" if prompt else "Prompt sent to the model: (none)"


def build_page(generator: Generator, model: str = DEFAULT_MODEL) -> gr.Blocks:
    roots = generator.roots
    with gr.Blocks(title="stage_min: STAGE demo", analytics_enabled=False) as page:
        gr.Markdown("# STAGE: a stem that plays along\nUpload a song (without the instrument you want: run a source "
                    "separator such as Demucs first), or set a tempo for a click track. The model writes one stem "
                    "for the whole song, window by window, and a mix of both.")
        with gr.Row():
            with gr.Column():
                song = gr.Audio(label="Song to accompany (used whole)", sources=["upload"], type="filepath", elem_id="song")
                with gr.Row():
                    bpm = gr.Number(label="or a click track: tempo in BPM (0 = none)", value=0, elem_id="bpm")
                    beats_per_bar = gr.Number(label="beats per bar", value=4, precision=0, elem_id="beats_per_bar")
                    seconds = gr.Number(label=f"click track length (s, at most {MAX_CLICK_SECONDS:g})", value=8.0,
                                        elem_id="seconds")
                with gr.Row():
                    genres = gr.Textbox(label="Genres", value="rock, indie", placeholder="rock, indie", elem_id="genres")
                    moods = gr.Textbox(label="Moods", value="groovy", placeholder="groovy, energetic", elem_id="moods")
                prompt = gr.Textbox(label="More description (after Genres and Moods)", value="", elem_id="prompt")
                # filled here, not by a page-load event: a load answered late (a cold server) would
                # overwrite a preview already updated by the user's typing
                sent = gr.Markdown(show_prompt(genres.value, moods.value, prompt.value), elem_id="prompt_sent")
                with gr.Row():
                    model_box = gr.Dropdown(label=f"Model (a STAGE folder or checkpoint under {roots_text(roots)})",
                                            value=model, choices=sorted({model, *local_models(roots)}),
                                            allow_custom_value=True, elem_id="model", scale=3)
                    name = gr.Textbox(label="Stem name (its file's name)", value=model_target(model, roots),
                                      elem_id="stem_name", scale=1)
                notice = gr.Markdown(model_notice(model, roots), elem_id="model_notice")
                stack = gr.Textbox(label=f"Then stack up to {MAX_STACK} more stems (optional): name=model, comma separated",
                                   value="", placeholder=f"bass={BASS_TOY}, keys=runs/keys", elem_id="stack")
                if (ROOT / EXAMPLE_SONG).is_file() and (ROOT / BASS_TOY / "config.json").is_file():
                    # the two shipped toys stacked over a chords-only song: drums first, then bass over both
                    gr.Examples([[str(ROOT / EXAMPLE_SONG), f"bass={BASS_TOY}", "rock, indie", "groovy"]],
                                [song, stack, genres, moods], label="Example: drums, then bass, over a chords-only song")
                own = recommended_sampling(model, roots)  # the default model's own settings (the toy: its temperature)
                with gr.Accordion("Sampling", open=False):
                    guidance = gr.Slider(1.0, 10.0, value=own.cfg_coef, step=0.5, label="Guidance (1 = off)")
                    top_k = gr.Number(label="Top-k (0 = off)", value=own.top_k, precision=0)
                    temperature = gr.Slider(0.1, 2.0, value=own.temperature, step=0.05, label="Temperature", elem_id="temperature")
                    seed = gr.Number(label="Seed (-1: a random one, shown with the result)", value=-1, elem_id="seed")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                stem_out = gr.Audio(label="Stem", type="filepath", interactive=False, elem_id="stem")
                stacked_out = [gr.Audio(label=f"Stacked stem {i + 1}", type="filepath", interactive=False, visible=False,
                                        elem_id=f"stacked_{i + 1}") for i in range(MAX_STACK)]
                mix_out = gr.Audio(label="Mix (song + stems, each at the same loudness)", type="filepath",
                                   interactive=False, elem_id="mix")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                summary = gr.Markdown(elem_id="summary")

        def generate(*args, progress=gr.Progress()):
            result = generator(*args, progress=progress)
            (first_name, first), *more = result.stems
            players = [gr.update(value=first, label=f"Stem: {first_name}")]
            players += [gr.update(value=more[i][1], label=f"Stacked: {more[i][0]}", visible=True) if i < len(more)
                        else gr.update(value=None, visible=False) for i in range(MAX_STACK)]
            return *players, result.mix, result.files, result.summary

        generate.generator = generator  # for the tests: which Generator this page runs
        for box in (genres, moods, prompt):
            box.change(show_prompt, [genres, moods, prompt], sent, queue=False, show_progress="hidden")
        model_box.change(lambda m: model_notice(m, roots), model_box, notice, queue=False, show_progress="hidden")
        run.click(generate, [song, bpm, beats_per_bar, genres, moods, prompt, model_box, seconds, guidance, top_k,
                             temperature, seed, stack, name], [stem_out, *stacked_out, mix_out, files, summary],
                  concurrency_limit=1)
    page.queue(default_concurrency_limit=1, max_size=16)  # one generation at a time: tabs wait their turn
    return page
