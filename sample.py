"""Generate a stem that plays along with a song or a click track (STAGE), or music from text alone.

    python sample.py --context song.wav --prompt "funky drums" --out drums.wav --mix-out mix.wav
    python sample.py --context song.wav --stems drums,bass --model drums=runs/drums --model bass=runs/bass --out out.wav
    python sample.py --context songs/ --model runs/drums --out drums/
    python sample.py --bpm 120 --duration 8 --prompt "rock drums" --out drums.wav
    python sample.py --prompt "lofi hip hop beat" --duration 5 --out music.wav
    python sample.py --model stage-drums.safetensors --context song.wav --genres "Rock, Indie Rock" --moods "energetic" --out drums.wav
"""
import signal
import sys

from stage_min.cli.options import OneLineParser, add_sampling_options, warnings_via_tqdm  # argparse only

# Only light imports here: everything else is imported inside functions, so that a Ctrl-C at any
# moment, even while torch is being imported, ends in one line ("error: interrupted", exit 130).


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--prompt", default="", help="text description of the stem (or of the music), free text (default: empty, the null text)")
    p.add_argument("--genres", help="comma list: builds the official STAGE caption 'Genres: a, b. Moods: x. ' "
                                    "(Discogs names, e.g. 'Rock, Indie Rock'); instead of --prompt (default: none, --prompt is used)")
    p.add_argument("--moods", help="comma list for the caption's 'Moods: ...' part (MTG-Jamendo moods, e.g. 'energetic, happy'; default: no Moods part)")
    p.add_argument("--out", required=True, help="output audio file: .wav, .flac, .ogg or .mp3 (a folder for a --context folder)")
    p.add_argument("--context", help="STAGE: audio to accompany (any format soundfile reads), or a folder of songs (default: none, no context: a stem from the prompt alone, or from --bpm's click track)")
    p.add_argument("--bpm", type=float, help="STAGE: accompany a click track at this tempo instead (default: no click track)")
    p.add_argument("--beats-per-bar", type=int, default=4, help="click track: beats per bar (louder downbeats)")
    p.add_argument("--offset", type=float, default=0.0, help="click track: time of the first click in seconds")
    p.add_argument("--mix-out", help="also write context + stem, as long as the stem (default: not written, but OUT_mix.wav with --stems)")
    p.add_argument("--overwrite", action="store_true", help="allow an output to replace the --context (or --continue) file")
    p.add_argument("--duration", type=float, help="seconds to generate (default: the context's length, however long; "
                   "5 s for text alone); with --context, a stem of at most one window next to the context's start")
    p.add_argument("--model", action="append", help="model folder, checkpoint file or hub id (default: the shipped toy "
                   "STAGE drums model, weights/stage-toy; e.g. facebook/musicgen-small or a train.py run for real "
                   "music); with --stems, once per stem as NAME=PATH")
    p.add_argument("--stems", help="stack stems in this order, e.g. drums,bass: each accompanies the context plus "
                   "the stems before it; writes OUT_NAME.wav per stem and the full mix (--mix-out, default OUT_mix.wav); default: one stem")
    p.add_argument("--continue", dest="continuation", help="a stem's first part (audio file): generation continues it (default: none)")
    p.add_argument("--whole-context", action="store_true", help="the original STAGE's inference: one stem (--duration, "
                   "default 10 s) on the whole --context, however long, instead of a stem as long as the song made in windows")
    p.add_argument("--window", type=float, default=10.0, help="a context longer than this is accompanied in windows "
                   "of this many seconds (10: the training windows; a model trained on one fixed window, such as the toy, "
                   "always uses its own, overlapping by half)")
    p.add_argument("--overlap", type=float, default=5.0, help="seconds of each window's stem given by the previous window")
    p.add_argument("--batch", type=int, default=4, help="--context FOLDER: songs per batch")
    p.add_argument("--t5", default=None, help="t5-base folder or hub id, for audiocraft / official STAGE checkpoints (default: the one the checkpoint bundles, else google-t5/t5-base)")
    add_sampling_options(p)  # each None unless given: the model's own setting
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: a fresh random draw each run)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations: the half types are faster on a GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    return p.parse_args(argv)


def main(argv=None):
    interrupted = []

    def on_interrupt(signum, frame):
        interrupted.append(signum)  # remembered even if the exception below is caught by a library
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_interrupt)
    except ValueError:  # not the main thread (called from a library): no handler of ours
        previous = None
    try:
        args = parse_args(argv)
        with warnings_via_tqdm():  # a warning goes above a progress bar, not onto its line
            from stage_min.cli.sample_job import run

            run(args, interrupted)
        if interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # every failure a user can cause ends in one line, never a traceback
        from stage_min.io.audio import AudioError
        from stage_min.io.loading import LoadError

        if not isinstance(e, (LoadError, AudioError, ValueError, OSError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
