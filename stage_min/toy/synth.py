"""Procedural stems for offline training runs: drums, bass and chords, drawn as notes and played by numpy
one-shots or (`--sounds gm`) by FluidSynth on General MIDI instruments (gm.py).

    python -m stage_min.toy.synth DIR --songs 16 [--seconds 20] [--seed 0] [--sounds synth|gm] [--overwrite]

writes DIR/song_000/{drums,bass,chords}.wav, beats.txt (one `<seconds> <position in bar>` line per
beat) and caption.txt, i.e. the plain layout that `stage_min.train.data` reads. DIR must be new or empty
(`--overwrite` writes into a folder that is not, replacing the songs of the same names).

The stems are deliberately coupled, so that a model can learn in few steps that the context
tells it about the target: the kick pattern changes every bar at random and the bass plays on
every kick, so only the context says where the next kick falls; the drum kit is tuned to the
song's key (over two octaves, so that kits differ clearly), busy songs have both sixteenth-note hats
and eighth-note chord stabs, and beat periods are whole codec frames (20 ms multiples), so that
every hit on a beat looks the same to the codec (off-beat eighths fall mid-frame when a beat is an
odd number of frames).
"""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..cli.options import OneLineParser

SAMPLE_RATE = 32000
FRAME = 640  # EnCodec 32 kHz hop: onsets on this grid
NOTES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
KICK, SNARE, HAT = 36, 38, 42  # General MIDI drum notes of the events (gm.py plays them)
P_KICK = 0.4  # chance of a kick on each eighth note but the first of the bar (always one)


def _env(n, decay, sr=SAMPLE_RATE):
    return np.exp(-np.arange(n) / (decay * sr))


def kick(freq, sr=SAMPLE_RATE):
    n = int(0.25 * sr)
    f = freq * (1 + 2.5 * np.exp(-np.arange(n) / (0.02 * sr)))  # pitch drop onto the key's root
    return 0.9 * np.sin(2 * np.pi * np.cumsum(f) / sr) * _env(n, 0.08)


def snare(freq, rng, sr=SAMPLE_RATE):
    n = int(0.18 * sr)
    tone = np.sin(2 * np.pi * freq * np.arange(n) / sr) * _env(n, 0.05)
    return 0.5 * (0.5 * tone + rng.standard_normal(n) * _env(n, 0.04))


def hat(freq, rng, sr=SAMPLE_RATE):
    n = int(0.05 * sr)
    noise = np.diff(rng.standard_normal(n + 1))  # crude high-pass
    tick = np.sin(2 * np.pi * freq * np.arange(n) / sr)
    return 0.2 * (0.5 * noise + tick) * _env(n, 0.01)


def pluck(freq, seconds, sr=SAMPLE_RATE):
    n = int(seconds * sr)
    t = np.arange(n) / sr
    wave = np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t)
    return 0.45 * wave * _env(n, 0.15) * np.minimum(1, t / 0.005)


def pad(freqs, seconds, sr=SAMPLE_RATE):
    n = int(seconds * sr)
    t = np.arange(n) / sr
    wave = sum(np.sign(np.sin(2 * np.pi * f * t)) * 0.4 + np.sin(2 * np.pi * f * t) for f in freqs)
    fade = np.minimum(1, np.minimum(t / 0.02, (seconds - t) / 0.05))
    return 0.08 * wave * fade


def _event(part_events, start, length, note, velocity):
    if velocity >= 1:
        part_events.append((int(start), int(length), int(note), int(min(127, velocity))))


def _add(track, start, sound):
    end = min(len(track), start + len(sound))
    if start < end:
        track[start:end] += sound[: end - start]


KITS = {  # fixed kits for the toy model: no sound names a song, the caption names the kit
    "rock": dict(kick=55.0, snare=190.0, hat=2600.0, genres="rock, indie"),
    "electronic": dict(kick=42.0, snare=320.0, hat=5200.0, genres="electronic, techno"),
    "lofi": dict(kick=70.0, snare=150.0, hat=1800.0, genres="hip hop, lofi"),
}


@dataclass
class Style:
    """How songs are drawn. The defaults are the original synthetic songs (kits tuned to the key,
    91-150 BPM on whole frames, 4/4); `TOY` is what the shipped toy model is trained on."""
    frames_per_beat: tuple = (20, 34)  # beat period range in codec frames (whole frames), high excluded
    bpm: tuple | None = None  # instead: a continuous tempo range (low, high); beats at exact samples
    meters: tuple = (4,)  # beats per bar to draw from
    kits: tuple = ()  # names in KITS to draw from; empty: a kit tuned to the song's key
    kick_on_beats: bool = False  # a kick on every beat (four on the floor), random ones between
    p_kick: float = P_KICK  # chance of a (further) kick on each eighth note
    offbeat_hats: float = 1.0  # level of the hats between beats (eighths, and sixteenths when busy)
    p_tempo_change: float = 0.0  # chance that a bar starts a new tempo (with `bpm`): the drums' own past
    # then cannot tell when the next beat falls, only the context can
    sounds: str = "synth"  # "synth": the numpy one-shots below; "gm": sampled instruments (gm.py), the
    # same notes played by FluidSynth on General MIDI kits and programs (numpy's when FluidSynth is absent)


TOY = Style(bpm=(70.0, 180.0), meters=(3, 4, 5), kits=tuple(KITS), kick_on_beats=True, p_kick=0.2, offbeat_hats=0.0)
TOY_TEMPO_CHANGES = replace(TOY, p_tempo_change=0.5)  # songs where only the context says when the next beat falls
TOY_GM = replace(TOY, sounds="gm")  # the toy's songs with sampled instruments: what weights/stage-toy hears today


def make_song(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE, style: Style = Style()) -> dict:
    """One song: {'drums', 'bass', 'chords': float32 audio, 'beats': (times, positions), 'caption'}."""
    if style.bpm is None:
        period = int(rng.integers(*style.frames_per_beat)) * FRAME  # e.g. 150 .. 91 BPM on whole frames
    else:
        period = int(round(60 * sr / rng.uniform(*style.bpm)))
    bpm = 60 * sr / period
    root = int(rng.integers(12))
    minor = bool(rng.random() < 0.5)
    root_hz = 55.0 * 2 ** (((root - 9) % 12) / 12)  # A1 = 55 Hz, so roots sit in 55..104 Hz
    per_bar = style.meters[int(rng.integers(len(style.meters)))] if len(style.meters) > 1 else style.meters[0]
    kit_name, (kick_hz, snare_hz, hat_hz) = _draw_kit(rng, style, root)
    busy = bool(rng.random() < 0.5)  # busy songs: hats on sixteenths and chord stabs on eighths
    third = 3 if minor else 4
    n = int(seconds * sr)
    drums, bass, chords = (np.zeros(n) for _ in range(3))
    events = {"drums": [], "bass": [], "chords": []}  # (start sample, length, MIDI note, velocity): for gm.py
    offset = int(rng.integers(0, 4)) * FRAME  # first downbeat a few frames in
    eighth = period // 2
    beats, positions = [], []
    hat_hit = hat(hat_hz, rng)  # one recorded hit per drum, reused: a sample-based kit
    snare_hit = snare(snare_hz, rng)
    kick_hit = kick(kick_hz)
    progression = [0, 5, 7, 3 if minor else 9]  # i-iv-v-(VI/vi) in semitones
    bar = 0
    start = offset
    chord_roots = []  # (time s, pitch class of the bar's chord root): what the bass should play
    while start < n:
        if bar and style.p_tempo_change and rng.random() < style.p_tempo_change:  # a new tempo from this bar on
            period = int(round(60 * sr / rng.uniform(*style.bpm)))
            eighth = period // 2
        for b in range(per_bar):
            beats.append((start + b * period) / sr)
            positions.append(b + 1)
        shift = progression[bar % 4]
        chord_roots.append((start / sr, (root + shift) % 12))
        # a new kick pattern every bar: the drums' own past does not tell where the next kick
        # falls, the bass (which plays on every kick) does
        pattern = [0] + [e for e in range(1, 2 * per_bar) if (style.kick_on_beats and e % 2 == 0) or rng.random() < style.p_kick]
        root_note = 33 + (root - 9) % 12 + shift  # MIDI note of the bar's root: A1 = 33
        for e in range(2 * per_bar):
            t = start + e * eighth
            hat_level = 1.0 if e % 2 == 0 else style.offbeat_hats
            _add(drums, t, hat_level * hat_hit)
            _event(events["drums"], t, FRAME * 4, HAT, 75 * hat_level)
            if busy:  # (the original songs snap the sixteenth to the frame grid)
                t16 = t + (eighth // 2 if style.bpm else eighth // 2 // FRAME * FRAME)
                _add(drums, t16, style.offbeat_hats * hat_hit)
                _event(events["drums"], t16, FRAME * 4, HAT, 60 * style.offbeat_hats)
            if e in pattern:
                _add(drums, t, kick_hit)
                _add(bass, t, pluck(root_hz * 2 ** (shift / 12) * 2, eighth / sr * 1.5))
                _event(events["drums"], t, FRAME * 8, KICK, 115)
                _event(events["bass"], t, int(eighth * 0.9), root_note + 12, 105)  # the pluck's octave
            if e % 4 == 2:  # snare on the even beats (2 and 4 in 4/4)
                _add(drums, t, snare_hit)
                _event(events["drums"], t, FRAME * 8, SNARE, 105)
        chord = [root_hz * 4 * 2 ** ((shift + iv) / 12) for iv in (0, third, 7)]
        chord_notes = [root_note + 24 + iv for iv in (0, third, 7)]
        if busy:
            for e in range(2 * per_bar):
                _add(chords, start + e * eighth, pad(chord, 0.7 * eighth / sr))
                for note in chord_notes:
                    _event(events["chords"], start + e * eighth, int(0.7 * eighth), note, 80)
        else:
            _add(chords, start, pad(chord, per_bar * period / sr))
            for note in chord_notes:
                _event(events["chords"], start, per_bar * period - FRAME, note, 80)
        start += per_bar * period
        bar += 1
    beats_in = [(t, p) for t, p in zip(beats, positions) if t < seconds]
    song = {"drums": drums.astype(np.float32), "bass": bass.astype(np.float32), "chords": chords.astype(np.float32),
            "beats": beats_in, "caption": _caption(kit_name, bpm, root, minor), "bpm": bpm, "beats_per_bar": per_bar,
            "chord_roots": chord_roots, "events": {part: [e for e in ev if e[0] < n] for part, ev in events.items()}}
    if style.sounds == "gm":  # drawn last, so that the notes are those of the numpy song of the same seed
        song["programs"] = _draw_programs(rng, kit_name)
    return song


def _draw_kit(rng: np.random.Generator, style: Style, root: int) -> tuple:
    """(kit name or None, (kick, snare, hat) Hz): one of style.kits, else a kit tuned to the key."""
    if style.kits:
        kit_name = style.kits[int(rng.integers(len(style.kits)))]
        kit = KITS[kit_name]
        return kit_name, (kit["kick"], kit["snare"], kit["hat"])
    kit_hz = 40.0 * 2 ** (root / 6)  # the kit follows the key over two octaves: low keys, low kits
    return None, (kit_hz, kit_hz * 4, kit_hz * 40)


def _caption(kit_name: str | None, bpm: float, root: int, minor: bool) -> str:
    if kit_name is not None:  # the official models' caption form (docs/original.md#captions)
        mood = "calm, relaxed" if bpm < 100 else "energetic, upbeat" if bpm > 140 else "groovy"
        return f"Genres: {KITS[kit_name]['genres']}. Moods: {mood}. "
    pace = "slow" if bpm < 110 else "fast" if bpm > 130 else "mid-tempo"
    return f"{pace} groove with drums, bass and chords in {NOTES[root]} {'minor' if minor else 'major'}"


def _draw_programs(rng: np.random.Generator, kit_name: str | None) -> dict:
    """General MIDI programs for a gm song: a drum kit of the song's kit family, a bass, a chord instrument."""
    from .gm import BASS_PROGRAMS, CHORD_PROGRAMS, DRUM_KITS

    kits = DRUM_KITS[kit_name] if kit_name is not None else DRUM_KITS["rock"]
    return {"drums": int(kits[int(rng.integers(len(kits)))]),
            "bass": int(BASS_PROGRAMS[int(rng.integers(len(BASS_PROGRAMS)))]),
            "chords": int(CHORD_PROGRAMS[int(rng.integers(len(CHORD_PROGRAMS)))])}


def write_dataset(folder, n_songs: int, seconds: float = 20.0, seed: int = 0, sr: int = SAMPLE_RATE, style: Style = Style()):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for first in range(0, n_songs, RENDER_BATCH):
        songs = make_songs(rng, min(RENDER_BATCH, n_songs - first), seconds, sr, style)
        for i, song in enumerate(songs, start=first):
            _write_song(folder / f"song_{i:03d}", song, sr)
    return folder


RENDER_BATCH = 200  # songs drawn, and rendered by FluidSynth, at a time


def make_songs(rng: np.random.Generator, n_songs: int, seconds: float, sr: int = SAMPLE_RATE, style: Style = Style()) -> list:
    """`n_songs` songs of make_song; with `style.sounds == "gm"` played on sampled instruments (gm.py),
    or, where FluidSynth is absent, with the numpy sounds and a warning."""
    from . import gm

    songs = [make_song(rng, seconds, sr, style) for _ in range(n_songs)]
    if style.sounds == "gm":
        if gm.available():
            gm.render_songs(songs, seconds, sr)
        else:
            warn_once("FluidSynth or a GM soundfont is missing: the songs use the numpy synth's sounds "
                      "(apt install fluidsynth timgm6mb-soundfont; pip install mido)")
    return songs


_warned = set()


def warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _write_song(d: Path, song: dict, sr: int):
    import soundfile as sf

    from ..train.data import format_beats

    d.mkdir(exist_ok=True)
    for stem in ("drums", "bass", "chords"):
        sf.write(d / f"{stem}.wav", np.clip(song[stem], -1, 1), sr, subtype="PCM_16")
    (d / "beats.txt").write_text(format_beats(*zip(*song["beats"])))
    (d / "caption.txt").write_text(song["caption"] + "\n")


MAX_SECONDS = 600.0  # ten minutes a song: enough for any test; a limit keeps a typo from filling the disk
MAX_SONGS = 100000


def check_args(args):
    """One-line errors for everything, before anything is written."""
    if not 1 <= args.songs <= MAX_SONGS:
        raise ValueError(f"--songs must be in [1, {MAX_SONGS}], got {args.songs}")
    if not 0 < args.seconds <= MAX_SECONDS:  # NaN fails too
        raise ValueError(f"--seconds must be > 0 and at most {MAX_SECONDS:g}, got {args.seconds:g}")
    if not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be in [0, 2^63 - 1], got {args.seed}")
    folder = Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder for the songs")
    if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
        raise ValueError(f"{folder} is not empty: its songs and captions would be overwritten "
                         "(choose a new folder, or pass --overwrite)")


def main(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("folder", help="where to write the songs: a new or empty folder")
    p.add_argument("--songs", type=int, default=16, help="songs to write")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each song")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole dataset")
    p.add_argument("--sounds", choices=("synth", "gm"), default="synth", help="numpy one-shots, or sampled GM "
                   "instruments (FluidSynth and a GM soundfont; numpy's sounds, with a warning, without them)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty (replacing its songs)")
    args = p.parse_args(argv)
    try:
        check_args(args)
        write_dataset(args.folder, args.songs, args.seconds, args.seed, style=replace(Style(), sounds=args.sounds))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.songs} songs to {args.folder}")


if __name__ == "__main__":
    main()
