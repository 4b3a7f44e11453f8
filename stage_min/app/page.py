"""The web demo's page and what its button does (app.py only parses options and starts the server).

Built on gradio: maintained, made for exactly this kind of page (audio in, audio out, a job queue,
progress bars), and what audiocraft's own MusicGen demo uses. Everything stays on this machine:
the server listens on 127.0.0.1 unless told otherwise, and gradio's telemetry and version check
are switched off before it is imported.
"""
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

from ..io.audio import AudioError, load_audio, save_audio  # noqa: E402
from ..io.loading import LoadError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "weights/stage-toy"  # the shipped toy STAGE model (drums; 2 s windows)
SAMPLE_RATE = 32000  # EnCodec 32 kHz
FRAME_RATE = 50
MAX_SECONDS = 14.98  # the context (cut to the stem's length), the separator and the stem share 30 s of frames


# ---- inputs -------------------------------------------------------------------------------------
def build_prompt(genres: str, moods: str, text: str) -> str:
    """The official STAGE models' caption form, `Genres: a, b. Moods: x. `, then any free text."""
    parts = []
    for label, value in (("Genres", genres), ("Moods", moods)):
        items = [item.strip() for item in (value or "").replace(";", ",").split(",") if item.strip()]
        if items:
            parts.append(f"{label}: {', '.join(items)}. ")
    return "".join(parts) + (text or "").strip()


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


def parse_stack(text: str) -> tuple[tuple[str, str], ...]:
    """`bass=weights/stage-bass, keys=PATH` -> [(name, model)]; a bad entry raises gr.Error."""
    stems = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, model = (x.strip() for x in item.partition("="))
        if not name or not model or not name.replace("_", "").replace("-", "").isalnum():
            raise gr.Error(f"Stack: write each stem as name=model, comma separated (bass=weights/stage-bass), got '{item.strip()}'.")
        if name.lower() in ("stem", "mix") or name.lower() in [n.lower() for n, _ in stems]:
            raise gr.Error(f"Stack: the stem name '{name}' is used twice or names an output (stem, mix).")
        stems.append((name, model))
    return tuple(stems)


def check_request(song, bpm, beats_per_bar, prompt, model, seconds, guidance, top_k, temperature, seed, stack="") -> Request:
    """Every input that can be checked before loading anything; a bad one raises gr.Error (a message
    in the page). The same rules as sample.py's options."""
    from ..generate import SamplingConfig

    bpm = bpm or None  # the field shows 0 when empty: no click track
    seed = None if seed is None or seed == -1 else seed
    if not song and bpm is None:
        raise gr.Error("Give a song to accompany (upload one) or a tempo in BPM for a click track.")
    if song and bpm is not None:
        raise gr.Error("Give a song or a tempo, not both: clear the BPM field to accompany the song.")
    if bpm is not None and not 20 <= bpm <= 400:
        raise gr.Error(f"The tempo must be between 20 and 400 BPM, got {bpm:g}.")
    if beats_per_bar is None or beats_per_bar != int(beats_per_bar) or not 1 <= beats_per_bar <= 16:
        raise gr.Error("Beats per bar must be a whole number from 1 to 16.")
    if seconds is None or not 0 < seconds <= MAX_SECONDS:
        raise gr.Error(f"The duration must be more than 0 and at most {MAX_SECONDS:g} seconds.")
    if top_k is None or top_k != int(top_k):
        raise gr.Error("Top-k must be a whole number (0 turns it off).")
    if seed is not None and (seed != int(seed) or seed < 0):
        raise gr.Error("The seed must be a whole number >= 0, or -1 for a random one.")
    if not (model or "").strip():
        raise gr.Error("Choose a model: a STAGE model folder or checkpoint file.")
    try:
        SamplingConfig(cfg_coef=guidance, top_k=int(top_k), temperature=temperature).check()
    except (ValueError, TypeError) as e:
        raise gr.Error(f"Sampling settings: {e}.") from None
    return Request(song, bpm, int(beats_per_bar), prompt, model.strip(), float(seconds), float(guidance), int(top_k),
                   float(temperature), None if seed is None else int(seed), parse_stack(stack))


def model_location(name: str) -> str:
    """A local folder or file (relative to the current folder, else to the repository), or a hub id.
    A path whose parent folder exists here (weights/stage-toy) is meant as a local one: when it is
    missing, say so rather than trying to download it."""
    for base in (Path.cwd(), ROOT):
        path = (base / name).expanduser()
        if path.exists():
            return str(path)
    looks_local = name.startswith((".", "/", "~")) or len(name.split("/")) != 2 or (Path.cwd() / name).parent.is_dir() \
        or (ROOT / name).parent.is_dir()
    if looks_local:
        hint = " Build the shipped toy with `python -m stage_min.toy weights/stage-toy`." if Path(name) == Path(DEFAULT_MODEL) else ""
        raise gr.Error(f"Model folder {name} not found.{hint}")
    return name  # a hub id: from_pretrained finds it in weights/ or downloads it (or says why it cannot)


def missing_model(name: str) -> str:
    """Why the chosen model cannot be found, or "" (shown under the model field as it is chosen)."""
    try:
        model_location(name)
    except gr.Error as e:
        return e.message
    return ""


def recommended_sampling(name: str):
    """The sampling a local model's config.json recommends (the toy's temperature), else the defaults;
    read without loading the model, to fill the Sampling fields."""
    import json

    from ..generate import SamplingConfig
    from ..io.pretrained import recommended_sampling as from_config

    try:
        config = json.loads((Path(model_location(name)) / "config.json").read_text())
        return from_config(config.get("sampling") if isinstance(config, dict) else None, name)
    except (gr.Error, LoadError, OSError, ValueError):  # not a local folder, or no readable config: the defaults
        return SamplingConfig()


def model_notice(name: str) -> str:
    message = missing_model(name)
    if message:
        return f"⚠️ {message}"
    changed = ", ".join(f"{k.replace('cfg_coef', 'guidance').replace('_', '-')} {v:g}"
                        for k, v in recommended_sampling(name).changed().items())
    return f"ℹ️ This model's recommended sampling: {changed} (set under Sampling)." if changed else ""


def read_context(request: Request) -> tuple[np.ndarray, list[str]]:
    """The audio to accompany (mono 32 kHz, cut to the stem's length) and notes for the page."""
    from ..io.metronome import metronome

    n_samples = round(request.seconds * FRAME_RATE) * (SAMPLE_RATE // FRAME_RATE)
    if request.song is None:
        return metronome(request.bpm, request.seconds, request.beats_per_bar, 0.0, SAMPLE_RATE), []
    try:
        audio = load_audio(request.song, SAMPLE_RATE)
    except AudioError as e:
        raise gr.Error(f"The song cannot be used: {str(e).split(': ', 1)[-1]}.") from None
    if len(audio) < SAMPLE_RATE // FRAME_RATE:
        raise gr.Error("The song is too short (less than 20 ms).")
    if np.abs(audio).max() < 1e-4:
        raise gr.Error("The song is silent.")
    notes = []
    if len(audio) > n_samples:
        notes.append(f"The song is {len(audio) / SAMPLE_RATE:.1f} s long; only its first part is used "
                     f"({request.seconds:g} s, the duration asked for).")
    elif len(audio) < n_samples:
        notes.append(f"The song is {len(audio) / SAMPLE_RATE:.1f} s long, shorter than the {request.seconds:g} s asked "
                     "for: the rest of the stem plays over silence.")
    return audio[:n_samples], notes


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
class Generator:
    """What the Generate button runs. Outputs go to a folder of this server's own, one subfolder per
    generation so that downloads are named stem.wav and mix.wav."""

    def __init__(self, t5: str | None = None):
        self.t5 = t5
        self.out_dir = None  # made at the first generation
        self.count = 0

    def cleanup(self):
        if self.out_dir is not None:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def __call__(self, song, bpm, beats_per_bar, genres, moods, prompt, model, seconds, guidance, top_k, temperature,
                 seed, stack="", progress=gr.Progress(track_tqdm=True)):
        request = check_request(song, bpm, beats_per_bar, build_prompt(genres, moods, prompt), model, seconds, guidance,
                                top_k, temperature, seed, stack)
        location = model_location(request.model)
        for _, stacked_model in request.stack:
            model_location(stacked_model)  # a missing model is said before anything runs
        try:
            return self.generate(request, location, progress)
        except gr.Error:
            raise
        except (LoadError, AudioError, ValueError, OSError) as e:  # bad input found late: its own message
            raise gr.Error(str(e)) from None
        except Exception as e:  # a bug: the details go to the server's log, the page gets one line
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(f"Generation failed ({type(e).__name__}: {e}); the server's log has the details.") from None

    def generate(self, request: Request, location: str, progress):
        import torch

        from ..generate import SamplingConfig

        start = time.perf_counter()
        progress(0.0, desc="reading the input")
        context, notes = read_context(request)
        progress(0.05, desc="loading the model (once)")
        model = get_model(location, self.t5)
        if model.context_token_added:
            notes.append(f"{request.model} is a plain MusicGen, not a STAGE model: the stem will not follow the song.")
        window = getattr(model, "window_frames", None)
        if window and request.seconds * FRAME_RATE > window:
            notes.append(f"This model was trained on {window / FRAME_RATE:g} s windows: a longer stem may not follow the "
                         "song as well.")
        for note in notes:
            gr.Warning(note)
        n_frames = max(1, round(request.seconds * FRAME_RATE))
        sampling = SamplingConfig(cfg_coef=request.guidance, top_k=request.top_k, temperature=request.temperature)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        audio, _ = model.accompany([torch.from_numpy(context)], [request.prompt], n_frames, sampling, seed=seed,
                                   progress=True)
        stem = audio[0, 0].cpu().numpy()
        mix = np.zeros_like(stem)
        mix[: min(len(stem), len(context))] = context[: len(stem)]
        mix += stem
        stacked = {}  # each later stem plays over the song and every stem made before it, as in training
        for i, (name, stacked_model) in enumerate(request.stack):
            progress(0.5 + 0.45 * i / len(request.stack), desc=f"stacking {name}")
            other = get_model(model_location(stacked_model), self.t5)
            audio, _ = other.accompany([torch.from_numpy(mix.copy())], [request.prompt], n_frames, sampling,
                                       seed=seed + 1 + i, progress=True)
            stacked[name] = audio[0, 0].cpu().numpy()
            mix = mix + stacked[name]

        progress(0.98, desc="writing the files")
        self.out_dir = self.out_dir or Path(tempfile.mkdtemp(prefix="stage_min_app_"))
        self.count += 1
        folder = self.out_dir / f"{self.count:04d}"
        folder.mkdir()
        stem_path, mix_path = folder / "stem.wav", folder / "mix.wav"
        save_audio(stem_path, stem, model.sample_rate)
        for name, audio in stacked.items():
            save_audio(folder / f"{name}.wav", audio, model.sample_rate)
        save_audio(mix_path, mix, model.sample_rate)
        source = "the song" if request.song else f"a click track at {request.bpm:g} BPM, {request.beats_per_bar} beats per bar"
        summary = (f"Generated {len(stem) / model.sample_rate:.2f} s of stem over {source} in "
                   f"{time.perf_counter() - start:.1f} s (seed {seed}; prompt: \"{request.prompt}\").")
        if stacked:
            summary += f" Stacked on it: {', '.join(stacked)}."
        files = [str(stem_path), *(str(folder / f"{name}.wav") for name in stacked), str(mix_path)]
        return str(stem_path), str(mix_path), files, summary


# ---- the page -----------------------------------------------------------------------------------
def local_models() -> list[str]:
    """Model folders found in weights/ (for the model menu; any other path can be typed in)."""
    weights = ROOT / "weights"
    found = sorted(f"weights/{p.name}" for p in weights.iterdir() if p.is_dir() and (p / "config.json").exists()) \
        if weights.is_dir() else []
    return found


def show_prompt(genres: str, moods: str, text: str) -> str:
    prompt = build_prompt(genres, moods, text)
    return f"Prompt sent to the model: `{prompt}`" if prompt else "Prompt sent to the model: (none)"


def build_page(generator: Generator, model: str = DEFAULT_MODEL) -> gr.Blocks:
    with gr.Blocks(title="stage_min: STAGE demo", analytics_enabled=False) as page:
        gr.Markdown("# STAGE: a stem that plays along\nUpload a song (without the instrument you want: run a source "
                    "separator such as Demucs first), or set a tempo for a click track. The model writes one stem "
                    "that fits it, and the mix of both.")
        with gr.Row():
            with gr.Column():
                song = gr.Audio(label="Song to accompany", sources=["upload"], type="filepath", elem_id="song")
                with gr.Row():
                    bpm = gr.Number(label="or a click track: tempo in BPM (0 = none)", value=0, elem_id="bpm")
                    beats_per_bar = gr.Number(label="beats per bar", value=4, precision=0, elem_id="beats_per_bar")
                with gr.Row():
                    genres = gr.Textbox(label="Genres", value="rock, indie", placeholder="rock, indie", elem_id="genres")
                    moods = gr.Textbox(label="Moods", value="groovy", placeholder="groovy, energetic", elem_id="moods")
                prompt = gr.Textbox(label="More description (after Genres and Moods)", value="", elem_id="prompt")
                # filled here, not by a page-load event: a load answered late (a cold server) would
                # overwrite a preview already updated by the user's typing
                sent = gr.Markdown(show_prompt(genres.value, moods.value, prompt.value), elem_id="prompt_sent")
                model_box = gr.Dropdown(label="Model (a STAGE folder or checkpoint file)", value=model,
                                        choices=sorted({model, *local_models()}), allow_custom_value=True, elem_id="model")
                notice = gr.Markdown(model_notice(model), elem_id="model_notice")
                stack = gr.Textbox(label="Then stack more stems (optional): name=model, comma separated", value="",
                                   placeholder="bass=weights/stage-bass", elem_id="stack")
                seconds = gr.Slider(0.5, MAX_SECONDS, value=4.0, step=0.5, label="Duration (s)", elem_id="seconds")
                own = recommended_sampling(model)  # the default model's own settings (the toy: its temperature)
                with gr.Accordion("Sampling", open=False):
                    guidance = gr.Slider(1.0, 10.0, value=own.cfg_coef, step=0.5, label="Guidance (1 = off)")
                    top_k = gr.Number(label="Top-k (0 = off)", value=own.top_k, precision=0)
                    temperature = gr.Slider(0.1, 2.0, value=own.temperature, step=0.05, label="Temperature", elem_id="temperature")
                    seed = gr.Number(label="Seed (-1: a random one, shown with the result)", value=-1, precision=0, elem_id="seed")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                stem_out = gr.Audio(label="Stem", type="filepath", interactive=False, elem_id="stem")
                mix_out = gr.Audio(label="Mix (song + stem)", type="filepath", interactive=False, elem_id="mix")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                summary = gr.Markdown(elem_id="summary")

        for box in (genres, moods, prompt):
            box.change(show_prompt, [genres, moods, prompt], sent, queue=False, show_progress="hidden")
        model_box.change(model_notice, model_box, notice, queue=False, show_progress="hidden")
        run.click(generator, [song, bpm, beats_per_bar, genres, moods, prompt, model_box, seconds, guidance, top_k,
                              temperature, seed, stack], [stem_out, mix_out, files, summary], concurrency_limit=1)
    page.queue(default_concurrency_limit=1, max_size=16)  # one generation at a time: tabs wait their turn
    return page
