"""docs/walkthrough.md's code blocks, run in order in one namespace: the tour cannot go stale."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "stage-toy"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "walkthrough.md").read_text(), flags=re.S)


@pytest.mark.skipif(not (TOY / "model.safetensors").exists(), reason="needs the shipped toy model in weights/stage-toy")
def test_walkthrough_runs(capsys):
    code = blocks()
    assert len(code) >= 8  # every section of the tour has its block
    namespace = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # the tour is run from the repository's folder
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"docs/walkthrough.md block {i + 1}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["loss"].item() > 0 and namespace["stem"].shape[-1] == 64000
