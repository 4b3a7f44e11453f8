"""Tiny random checkpoints in the real file layouts, built once per test session."""
import logging

import pytest

from stage_min import tiny

logging.getLogger("transformers").setLevel(logging.ERROR)


def build_tiny_hf(folder, seed=0, **config):
    """A random transformers MusicGen saved with save_pretrained, plus a spiece.model."""
    return tiny.build(folder, seed=seed, **config)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(folder, transformers model) of one tiny random MusicGen."""
    folder = tmp_path_factory.mktemp("tiny_musicgen")
    model = build_tiny_hf(folder)
    return folder, model
