"""Sampled instruments for the synthetic songs: note events -> MIDI (mido) -> FluidSynth + a GM soundfont.

The numpy synth (`synth.py`) draws a song as note events and plays them with its own one-shot
sounds; this module plays the same events with recorded instruments instead: drums on General MIDI
drum kits (channel 10), bass and a chord instrument on GM programs.

Soundfont: TimGM6mb (Debian's `timgm6mb-soundfont`, 6 MB, GPL-2): a whole GM set with eight drum kits
in a file 25 times smaller than FluidR3_GM (`fluid-soundfont-gm`, 145 MB), so that CI installs it in
seconds. Another GM soundfont is used when STAGE_SOUNDFONT names it.

Speed: FluidSynth renders some 600 s of audio a second, but starting it takes 0.1 s, so songs are
rendered many at a time: each part of a batch of songs is one MIDI file (the songs one after the other,
GAP_SECONDS apart so that release tails do not reach the next song), rendered once and cut up.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/sounds/sf2/FluidR3_GM.sf2")
GAP_SECONDS = 3.0  # silence between songs in one rendering: longer than any release tail
DRUM_CHANNEL = 9  # GM's channel 10
# two GM drum kits for each of the toy's caption kits (bank 128 presets of TimGM6mb)
DRUM_KITS = {"rock": (16, 0), "electronic": (25, 24), "lofi": (32, 8)}  # Power/Standard, TR-808/Electronic, Jazz/Room
BASS_PROGRAMS = (33, 34, 38)  # fingered, picked, synth bass 1
CHORD_PROGRAMS = (0, 4, 27)  # acoustic piano, electric piano 1, clean guitar
PEAK = {"drums": 0.8, "bass": 0.6, "chords": 0.4}  # each stem's peak after rendering: the numpy synth's levels


class RenderError(RuntimeError):
    """FluidSynth failed; the message says how."""


def soundfont() -> str | None:
    """The GM soundfont to use: $STAGE_SOUNDFONT, else the first of SOUNDFONTS that exists."""
    chosen = os.environ.get("STAGE_SOUNDFONT")
    if chosen:
        return chosen if Path(chosen).is_file() else None
    return next((f for f in SOUNDFONTS if Path(f).is_file()), None)


def available() -> bool:
    """FluidSynth, mido and a soundfont are all here."""
    try:
        import mido  # noqa: F401
    except ImportError:
        return False
    return shutil.which("fluidsynth") is not None and soundfont() is not None


def write_midi(path, notes, channel: int, sample_rate: int):
    """notes: (start sample, length in samples, MIDI note, velocity, program or None). A note whose
    program is given changes the channel's program first. One MIDI tick is one sample."""
    import mido

    midi = mido.MidiFile(ticks_per_beat=sample_rate // 2)  # at 120 BPM (the default tempo) a tick is a sample
    track = mido.MidiTrack()
    midi.tracks.append(track)
    events = []  # (tick, order, message): note-offs before program changes before note-ons at one tick
    for start, length, note, velocity, program in notes:
        if program is not None:
            events.append((start, 1, mido.Message("program_change", channel=channel, program=program)))
        events.append((start, 2, mido.Message("note_on", channel=channel, note=note, velocity=velocity)))
        events.append((start + max(1, length), 0, mido.Message("note_off", channel=channel, note=note, velocity=0)))
    events.sort(key=lambda e: (e[0], e[1]))
    now = 0
    for tick, _, message in events:
        track.append(message.copy(time=tick - now))
        now = tick
    midi.save(path)


def render(midi_path, wav_path, sample_rate: int, font: str):
    """FluidSynth, dry (no reverb or chorus: a stem as a multitrack holds it), to a 16-bit wav."""
    cmd = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r", str(sample_rate),
           "-F", str(wav_path), "-T", "wav", "-O", "s16", font, str(midi_path)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RenderError(f"fluidsynth failed: {e}") from None
    if result.returncode != 0 or not Path(wav_path).is_file():
        raise RenderError(f"fluidsynth failed ({result.returncode}): {result.stderr.strip()[:200]}")


def render_songs(songs: list, seconds: float, sample_rate: int) -> None:
    """Replace each song's 'drums', 'bass' and 'chords' audio by the GM rendering of its 'events'
    (synth.make_song's), in place. Each part is rendered once for all songs."""
    import soundfile as sf

    if not available():
        raise RenderError("FluidSynth, mido or a GM soundfont is missing (apt install fluidsynth timgm6mb-soundfont; "
                          "pip install mido)")
    font = soundfont()
    n = int(seconds * sample_rate)
    stride = n + int(GAP_SECONDS * sample_rate)
    with tempfile.TemporaryDirectory(prefix="stage-gm-") as tmp:
        for part in ("drums", "bass", "chords"):
            notes = []
            for i, song in enumerate(songs):
                program = song["programs"][part]
                first = True
                for start, length, note, velocity in song["events"][part]:
                    notes.append((i * stride + start, length, note, velocity, program if first else None))
                    first = False
                if first:  # a song with no note in this part: set its program anyway (harmless)
                    notes.append((i * stride, 1, 0, 0, program))
            midi, wav = Path(tmp) / f"{part}.mid", Path(tmp) / f"{part}.wav"
            write_midi(midi, notes, DRUM_CHANNEL if part == "drums" else 0, sample_rate)
            render(midi, wav, sample_rate, font)
            audio, rate = sf.read(wav, dtype="float32", always_2d=True)
            if rate != sample_rate:
                raise RenderError(f"fluidsynth wrote {rate} Hz, not {sample_rate}")
            audio = audio.mean(axis=1)
            audio = np.pad(audio, (0, max(0, len(songs) * stride - len(audio))))
            for i, song in enumerate(songs):
                stem = audio[i * stride: i * stride + n].astype(np.float32)
                peak = np.abs(stem).max()
                song[part] = stem * (PEAK[part] / peak) if peak > 1e-4 else np.zeros(n, dtype=np.float32)
