"""A model's own sampling settings (config.json's "sampling", e.g. the toy's temperature): loaded, used
where no sampling is given, replaced by what a user gives, kept by export, and refused when malformed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage_min.generate import SamplingConfig
from stage_min.io.loading import LoadError
from stage_min.io.pretrained import from_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled(stage_run, tmp_path_factory):
    """A self-contained STAGE folder (LM, T5 and codec in one), as the toy is shipped."""
    from stage_min.io.formats import export_native

    folder = tmp_path_factory.mktemp("bundled") / "model"
    export_native(from_pretrained(str(stage_run)), folder)
    return folder


def with_sampling(bundled, tmp_path, section):
    folder = tmp_path / "model"
    shutil.copytree(bundled, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sampling"] = section
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_sampling_is_the_models_default(bundled, tmp_path):
    assert from_pretrained(str(bundled)).sampling == SamplingConfig()  # none given: MusicGen's defaults
    model = from_pretrained(str(with_sampling(bundled, tmp_path, {"temperature": 0.5, "top_k": 1})))
    assert model.sampling == SamplingConfig(temperature=0.5, top_k=1)
    # what a user gives wins, the rest stays the model's
    assert model.sampling_with(temperature=None, top_k=7, cfg_coef=None) == SamplingConfig(temperature=0.5, top_k=7)
    # no sampling given: the model's own (top-k 1 is greedy, so any seed gives the same codes)
    _, own = model.generate(["a"], 6, seed=0)
    _, greedy = model.generate(["a"], 6, SamplingConfig(temperature=0.5, top_k=1), seed=1)
    _, sampled = model.generate(["a"], 6, SamplingConfig(temperature=2.0), seed=1)
    assert torch.equal(own, greedy) and not torch.equal(own, sampled)
    _, own_context = model.accompany([torch.randn(32000)], ["a"], 6, seed=0)
    _, greedy_context = model.accompany([torch.randn(32000)], ["a"], 6, SamplingConfig(top_k=1), seed=3)
    assert own_context.shape == greedy_context.shape == (1, 4, 6)


def test_export_keeps_the_models_sampling(bundled, tmp_path):
    from stage_min.io.formats import export_native

    model = from_pretrained(str(with_sampling(bundled, tmp_path, {"temperature": 0.6})))
    export_native(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["sampling"] == {"temperature": 0.6}
    assert from_pretrained(str(tmp_path / "exported")).sampling.temperature == 0.6
    plain = from_pretrained(str(bundled))
    export_native(plain, tmp_path / "plain")
    assert "sampling" not in json.loads((tmp_path / "plain" / "config.json").read_text())


@pytest.mark.parametrize("section, message", [
    ("hot", "must be an object"),
    ({"temprature": 0.5}, "must be an object with some of"),
    ({"temperature": "0.5"}, "is not a finite number"),
    ({"temperature": True}, "is not a finite number"),
    ({"top_k": 2.5}, "is not a finite whole number"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"top_p": 2}, "top-p must be in [0, 1]"),
])
def test_bad_sampling_section_is_a_load_error(bundled, tmp_path, section, message):
    with pytest.raises(LoadError, match="'sampling'") as e:
        from_pretrained(str(with_sampling(bundled, tmp_path, section)))
    assert message in str(e.value)


def test_sample_cli_uses_the_models_temperature_unless_given(bundled, tmp_path):
    """sample.py without --temperature: the model's; with it: the one given (results.json of evaluate.py too)."""
    import sample
    from stage_min.cli import sample_job

    folder = with_sampling(bundled, tmp_path, {"temperature": 0.25})
    args = sample.parse_args(["--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.wav")])
    args.stem_models = {"stem": str(folder)}
    assert sample_job.load_models(args)["stem"].sampling.temperature == 0.25
    args.temperature = 1.5
    assert sample_job.load_models(args)["stem"].sampling == SamplingConfig(temperature=1.5)
    out = tmp_path / "tempo"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "tempo", "--model", str(folder), "--bpm", "120",
                        "--seeds", "1", "--seconds", "0.5", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads((out / "results.json").read_text())["sampling"]["temperature"] == 0.25
