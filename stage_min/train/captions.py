"""The caption form the official STAGE checkpoints were trained on (docs/original.md#captions).

STAGE auto-labelled every song's mixture with essentia: Discogs-EffNet genres (threshold 0.1,
Discogs' capitalised names such as "Rock, Alternative Rock") and MTG-Jamendo moods/themes
(threshold 0.05, lower case such as "energetic, happy"), stored as comma lists in the song's
`features.json` (keys "genres", "moods"). Its dataset turns them into `Genre: a. ` for one item and
`Genres: a, b, c. ` for more, the same for `Mood:`/`Moods:`, keeping the first 3 items of each list
(`original_caption`). Half of the training captions were dropped (the null text).
"""
import json
from pathlib import Path


def _part(label: str, items: list[str]) -> str:
    return f"{label}{'s' if len(items) > 1 else ''}: {', '.join(items)}. "


def original_caption(features: dict, max_genres: int = 3, max_moods: int = 3) -> str:
    """The caption the original builds from a song's features.json: for each of "genres" and
    "moods" present, the string split on commas, the first `max_*` items stripped, then
    `Genre: x. ` / `Genres: a, b, c. ` and `Mood: x. ` / `Moods: a, b, c. `. As in the original, an
    empty list string still gives its label (`Genre: . `); a missing key gives no part (the original
    fails there)."""
    out = ""
    for key, label, n in (("genres", "Genre", max_genres), ("moods", "Mood", max_moods)):
        if features.get(key) is None:
            continue
        out += _part(label, [s.strip() for s in str(features[key]).split(",")[:n]])
    return out


def caption_from_features(path: Path) -> str:
    """original_caption of a features.json file; ValueError (one line) when it is not a JSON object."""
    try:
        features = json.loads(Path(path).read_text(errors="replace"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__})") from None
    if not isinstance(features, dict):
        raise ValueError(f"{path}: not a JSON object")
    return original_caption(features)


def stage_caption(genres: str | None = None, moods: str | None = None) -> str:
    """Comma lists -> the training captions' form: `Genre: x. ` / `Genres: a, b, c. ` and `Mood: x. ` /
    `Moods: a, b. `, a part only for what is given, items trimmed, the first 3 of each kept (the model
    never saw more). Raises ValueError for a list with no item. sample.py's --genres/--moods and the
    demo page use it."""
    parts = []
    for flag, label, value in (("--genres", "Genre", genres), ("--moods", "Mood", moods)):
        if value is None:
            continue
        items = [w.strip() for w in value.split(",") if w.strip()]
        if not items:
            raise ValueError(f"{flag} has no item (give a comma-separated list)")
        parts.append(_part(label, items[:3]))
    return "".join(parts)
