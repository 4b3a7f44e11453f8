"""Evaluation: beat F-measure, FAD/KAD, the tempo and accompaniment experiments; the original STAGE loop as a reference."""
