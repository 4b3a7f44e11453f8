"""The original STAGE's training checkpoints (Lightning .ckpt): read with no code execution.

The `.ckpt` is built here the way the original's trainer writes it (docs/original.md#checkpoints):
Lightning's entries, the weights under `state_dict`, and `hyper_parameters = {"params":
MusicgenParams(...)}` whose dataclasses come from a stand-in of the original's package (`stage`)
and of `frozendict`, written to a temporary folder and removed from `sys.modules` before loading, so
that they are absent at load time. Payload variants must be refused without running anything.
"""
import builtins
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from stage_min.io import lightning_ckpt
from stage_min.io.convert import main as convert_main
from stage_min.io.formats import detect_layout
from stage_min.io.loading import LoadError
from stage_min.io.pretrained import from_pretrained
from test_formats import stage_ckpt, stage_reference, stage_rows, t5_dir  # noqa: F401 (fixtures)

FAKE = {
    "frozendict/__init__.py": """
        class frozendict(dict):
            def __reduce__(self):
                return (frozendict, (dict(self),))
    """,
    "stage/__init__.py": "",
    "stage/data/__init__.py": "",
    "stage/data/stem.py": """
        from enum import IntEnum
        class Stem(IntEnum):
            DRUMS = 0
            BASS = 1
            OTHER = 6
    """,
    "stage/conditioning/__init__.py": "",
    "stage/conditioning/condition_type.py": """
        from enum import Enum
        class ConditionType(Enum):
            DESCRIPTION = "description"
    """,
    "stage/conditioning/conditioning_method.py": """
        from enum import Enum
        class ConditioningMethod(Enum):
            CROSS_ATTENTION = "cross_attention"
    """,
    "stage/conditioning/prompt_processor.py": "class InterleavedContextPromptProcessor:\n    pass\n",
    "stage/conditioning/t5embedder.py": "class T5EmbedderGPU:\n    pass\n",
    "stage/hyperparameters.py": """
        from dataclasses import dataclass, field
        from pathlib import Path
        from typing import Optional, Set
        from frozendict import frozendict
        from stage.data.stem import Stem

        @dataclass(unsafe_hash=True, kw_only=True)
        class ModelParams:
            model_class: str

        @dataclass(unsafe_hash=True)
        class SeaNetParams:
            dimension: int
            ratios: tuple
            activation_params: frozendict = field(default_factory=frozendict)

        @dataclass(unsafe_hash=True, kw_only=True)
        class EncodecParams(ModelParams):
            sample_rate: int
            seanet_params: SeaNetParams
            weights: Optional[str] = None
            model_class: str = "stage.models.lightning_encodec.LightningEncodec"

        @dataclass(unsafe_hash=True)
        class PromptProcessorParams:
            keep_only_valid_steps: bool
            model_class: type
            context_dropout: Optional[float] = None

        @dataclass(unsafe_hash=True)
        class ConditioningParams:
            embedder_types: dict
            conditioning_methods: dict
            conditioning_dropout: float

        @dataclass(unsafe_hash=True, kw_only=True)
        class LmParams(ModelParams):
            dim: int
            n_layers: int
            n_heads: int
            card: int = 2048
            padding_token: Optional[int] = 2048
            sep_token: Optional[int] = None
            cross_attend: bool = True
            weights: Optional[str] = None
            model_class: str = "stage.models.musicgen_lm.MusicgenLm"

        @dataclass(unsafe_hash=True, kw_only=True)
        class MusicgenParams(ModelParams):
            encodec_params: EncodecParams
            prompt_processor_params: PromptProcessorParams
            conditioning_params: ConditioningParams
            lm_params: LmParams
            lora_params: Optional[object] = None
            model_class: str = "stage.models.lightning_musicgen.LightningMusicgen"

        @dataclass(kw_only=True)
        class StemmedDatasetParams:
            root_dir: Path
            stems: Set[Stem]
            target_stem: Stem
    """,
}


def _with_fake_original(tmp_path, make):
    """Run make() with the stand-in packages importable, then remove every trace of them."""
    root = tmp_path / "fake_original"
    for rel, src in FAKE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(src))
    sys.path.insert(0, str(root))
    try:
        return make()
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in ("stage", "frozendict")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def original_params(extra=None):
    hp = importlib.import_module("stage.hyperparameters")
    from frozendict import frozendict
    from pathlib import Path

    ct = importlib.import_module("stage.conditioning.condition_type").ConditionType
    cm = importlib.import_module("stage.conditioning.conditioning_method").ConditioningMethod
    t5 = importlib.import_module("stage.conditioning.t5embedder").T5EmbedderGPU
    pp = importlib.import_module("stage.conditioning.prompt_processor").InterleavedContextPromptProcessor
    Stem = importlib.import_module("stage.data.stem").Stem
    params = hp.MusicgenParams(
        encodec_params=hp.EncodecParams(sample_rate=32000, seanet_params=hp.SeaNetParams(128, (8, 5, 4, 4), frozendict(alpha=1.0)),
                                        weights=str(Path("/home/someone/weights/encodec_32khz.pt"))),
        prompt_processor_params=hp.PromptProcessorParams(keep_only_valid_steps=True, model_class=pp, context_dropout=0.1),
        conditioning_params=hp.ConditioningParams(embedder_types={ct.DESCRIPTION: t5},
                                                  conditioning_methods={ct.DESCRIPTION: cm.CROSS_ATTENTION}, conditioning_dropout=0.5),
        lm_params=hp.LmParams(dim=128, n_layers=2, n_heads=2, sep_token=2049, weights=extra or "/w/lm-small-weights.pt"))
    data = hp.StemmedDatasetParams(root_dir=Path("/data/moisesdb"), stems={Stem.DRUMS, Stem.BASS, Stem.OTHER}, target_stem=Stem.DRUMS)
    return params, data


def lightning_ckpt_dict(state, params, data=None):
    """What Lightning's trainer (2.x) saves for the original's LightningMusicgen."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    out = {
        "epoch": 3, "global_step": 12000, "pytorch-lightning_version": "2.2.1",
        "state_dict": {k: v.float() for k, v in state.items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
                      "'train_time_interval': None}": {"monitor": None, "best_model_score": None, "kth_value": torch.tensor(float("inf")),
                                                       "dirpath": "/out/stage-drums", "best_k_models": {}, "last_model_path": ""}},
        "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
        "MixedPrecision": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7},
        "hparams_name": "kwargs", "hyper_parameters": {"params": params},
    }
    if data is not None:
        out["datamodule_hyper_parameters"] = {"params": data}
    return out


@pytest.fixture
def original_ckpt(stage_ckpt, tmp_path):
    state = load_file(str(stage_ckpt[0]))
    path = tmp_path / "last.ckpt"

    def make():
        params, data = original_params()
        torch.save(lightning_ckpt_dict(state, params, data), path)

    _with_fake_original(tmp_path, make)
    assert "stage" not in sys.modules and "frozendict" not in sys.modules
    return path


@torch.no_grad()
def test_original_ckpt_loads_with_identical_logits(original_ckpt, stage_reference, t5_dir):
    with pytest.raises(Exception, match="Unsupported global|Weights only load failed"):  # what weights_only does
        torch.load(original_ckpt, weights_only=True)
    assert detect_layout(str(original_ckpt)) == ("stage", original_ckpt)
    model = from_pretrained(str(original_ckpt), t5=str(t5_dir))
    seq, text, text_mask, expected = stage_reference
    assert torch.equal(model.lm(seq.grid, text, text_mask, seq.keep), expected)
    assert "stage" not in sys.modules and "frozendict" not in sys.modules  # nothing was imported


def test_original_ckpt_hyper_parameters_are_plain_data(original_ckpt):
    pkg = lightning_ckpt.read_lightning_ckpt(original_ckpt)
    params = pkg["hyper_parameters"]["params"]
    assert isinstance(params, lightning_ckpt.Record) and params.origin == "stage.hyperparameters.MusicgenParams"
    assert (params.lm_params.dim, params.lm_params.n_layers, params.lm_params.sep_token) == (128, 2, 2049)
    assert params.encodec_params.seanet_params.activation_params == {"alpha": 1.0}
    info = lightning_ckpt.summary(pkg)
    assert info["lm"]["n_heads"] == 2 and info["epoch"] == 3 and info["global_step"] == 12000
    assert info["prompt_processor"] == {"model_class": "<class stage.conditioning.prompt_processor.InterleavedContextPromptProcessor>",
                                        "keep_only_valid_steps": True, "context_dropout": 0.1}
    assert info["conditioning"]["conditioning_dropout"] == 0.5
    assert info["conditioning"]["conditioning_methods"] == {"ConditionType('description')": "ConditioningMethod('cross_attention')"}
    assert info["target_stem"] == "Stem.DRUMS (drums)"
    data = pkg["datamodule_hyper_parameters"]["params"]
    assert str(data.root_dir) == "/data/moisesdb"


def test_convert_info_shows_the_hyper_parameters(original_ckpt, capsys):
    assert convert_main(["--info", str(original_ckpt)]) == 0
    out = capsys.readouterr().out
    assert '"layout": "stage"' in out and '"sep_token": 2049' in out and "Stem.DRUMS" in out and '"global_step": 12000' in out


class Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker):
    m = str(marker)
    return {
        "os.system": Payload(os.system, f"touch {m}"),
        "builtins.eval": Payload(builtins.eval, f"open({m!r}, 'w')"),
        "builtins.exec": Payload(builtins.exec, f"open({m!r}, 'w')"),
        "subprocess.check_call": Payload(subprocess.check_call, ["touch", m]),
        "builtins.getattr": Payload(getattr, [], "append"),
        "importlib.import_module": Payload(importlib.import_module, "os"),
        "torch.load": Payload(torch.load, m),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.check_call", "builtins.getattr",
                                  "importlib.import_module", "torch.load"])
@pytest.mark.parametrize("where", ["hyper-parameter field", "top level", "state dict"])
def test_payload_variants_never_run(name, where, stage_ckpt, tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    state = {k: v for k, v in load_file(str(stage_ckpt[0])).items() if k.startswith("lm.decoder.token_emb")}

    def make():
        params, _ = original_params()
        payload = _payloads(marker)[name]
        pkg = lightning_ckpt_dict(state, params)
        if where == "hyper-parameter field":
            params.lm_params.weights = payload
        elif where == "top level":
            pkg["hparams_name"] = payload
        else:
            pkg["state_dict"]["lm.decoder.evil"] = payload
        torch.save(pkg, path)

    _with_fake_original(tmp_path, make)
    for read in (lambda: from_pretrained(str(path)), lambda: lightning_ckpt.read_lightning_ckpt(path),
                 lambda: convert_main(["--info", str(path)])):
        try:
            result = read()
        except LoadError as e:
            assert "\n" not in str(e) and "refused" in str(e) and "not on the allow-list" in str(e)
        else:
            assert result == 2  # convert --info: one line on stderr, exit code 2
        assert not marker.exists()


def test_refusal_is_one_line_on_the_command_line(stage_ckpt, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(os.system, f"touch {marker}")}, path)
    assert convert_main(["--info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and "system" in err
    assert not marker.exists()


def test_records_never_call_the_named_class():
    """A name of the original's package is a record even when something of that name is importable."""
    import io

    u = lightning_ckpt.RestrictedUnpickler(io.BytesIO(b""))
    Cls = u.find_class("stage.utils.audio", "stretch")
    rec = Cls("anything", 1)
    assert isinstance(rec, lightning_ckpt.Record) and rec.args == ("anything", 1)
    with pytest.raises(lightning_ckpt.UnsafePickle):
        u.find_class("os", "system")
    with pytest.raises(lightning_ckpt.UnsafePickle):
        u.find_class("__builtin__", "__import__")
