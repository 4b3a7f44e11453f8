"""Tiny random checkpoints in the real file layouts, built once per test session."""
import logging

import pytest

from stage_min.toy import tiny

logging.getLogger("transformers").setLevel(logging.ERROR)


def build_tiny_hf(folder, seed=0, **config):
    """A random transformers MusicGen saved with save_pretrained, plus a spiece.model. Its LayerNorms
    and biases are random too (not transformers' constant init): a swapped norm in a key table
    changes the logits."""
    return tiny.build(folder, seed=seed, random_norms=True, **config)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(folder, transformers model) of one tiny random MusicGen."""
    folder = tmp_path_factory.mktemp("tiny_musicgen")
    model = build_tiny_hf(folder)
    return folder, model


@pytest.fixture(scope="module")
def stage_run(tiny_hf, tmp_path_factory):
    """A STAGE checkpoint in our native layout (LM with the context token; T5/EnCodec from the base)."""
    from stage_min.io.loading import save_native
    from stage_min.io.pretrained import from_pretrained

    model = from_pretrained(str(tiny_hf[0]), stage=True)
    run = tmp_path_factory.mktemp("stage_run")
    save_native(run, model.lm.state_dict(), model.lm.cfg, base=str(tiny_hf[0]))
    return run
