"""The caption form the official STAGE checkpoints were trained on (REFERENCE.md section 8.6).

STAGE auto-labelled every song's mixture with essentia: the top 3 Discogs-EffNet genres (threshold
0.1, Discogs' capitalised names such as "Rock, Alternative Rock") and the top 3 MTG-Jamendo
moods/themes (threshold 0.05, lower case such as "energetic, happy"), written as
`Genres: a, b, c. Moods: x, y, z. `; the examples shipped with the code use this form, and one of
them has the moods part alone. Half of the training captions were dropped (the null text).
"""


def stage_caption(genres: str | None = None, moods: str | None = None) -> str:
    """Comma lists -> `Genres: a, b. Moods: x. ` (a part only for what is given; items are trimmed
    and re-joined with ", "). Raises ValueError for a list with no item."""
    parts = []
    for label, value in (("Genres", genres), ("Moods", moods)):
        if value is None:
            continue
        items = [w.strip() for w in value.split(",") if w.strip()]
        if not items:
            raise ValueError(f"--{label.lower()} has no item (give a comma-separated list)")
        parts.append(f"{label}: {', '.join(items)}. ")
    return "".join(parts)
