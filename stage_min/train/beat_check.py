"""How often the librosa downbeat rule (beats.py) finds the bar phase, on annotated songs:

    python -m stage_min.train.beat_check DATA [--songs N]

DATA: song folders whose beats.txt has positions in the bar (python -m stage_min.toy.synth writes them).
"""
import sys

import numpy as np

from ..cli.options import OneLineParser
from ..io.audio import AudioError
from .beats import phase_accuracy
from .data import DataError, find_songs, load_stem, parse_beats


def main(argv=None):
    p = OneLineParser(prog="python -m stage_min.train.beat_check", description="How often the librosa downbeat rule finds the bar phase, on songs "
                                            "whose beats.txt has positions (e.g. python -m stage_min.toy.synth output).")
    p.add_argument("data", help="dataset folder (one folder per song, with beats.txt)")
    p.add_argument("--songs", type=int, default=0, help="at most this many songs (0 = all)")
    a = p.parse_args(argv)
    try:
        songs = [s for s in find_songs(a.data) if s.beats_file is not None]
        songs = songs[: a.songs] if a.songs > 0 else songs
        items = []
        for s in songs:
            stems = [load_stem(f, 32000) for f in s.stems.values()]
            mix = np.zeros(max(len(x) for x in stems), dtype=np.float32)
            for x in stems:
                mix[:len(x)] += x
            times, down = parse_beats(s.beats_file.read_text())
            if down.any():
                items.append((mix, 32000, times, down))
    except (DataError, AudioError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    r = phase_accuracy(items)
    print(f"{r['songs']} songs: bar phase right in {100 * r['rule']:.1f} % with the annotated beats, "
          f"{100 * r['tracked']:.1f} % with librosa's beats")


if __name__ == "__main__":
    main()
