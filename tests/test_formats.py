"""Checkpoint layouts: audiocraft and official STAGE checkpoints in, transformers and native out.

Each layout is built here from tiny random weights: the audiocraft files from a transformers model
through the key table of REFERENCE.md section 4 and audiocraft's SEANet/RVQ names; the STAGE file
from x-transformers 1.26.0 modules set up as the STAGE code sets them up. Logits are compared with
the reference implementation of each layout (transformers, x-transformers).
"""
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from stage_min import delay
from stage_min.convert import main as convert_main
from stage_min.formats import detect_layout, export_hf, export_native
from stage_min.loading import LoadError
from stage_min.pipeline import MusicGen
from stage_min.stage import build_sequence

PROMPT = ["funky drums with a tight snare"]
TOL = 1e-4


# ---- writing the audiocraft layout from a transformers model -------------------------------------
def audiocraft_lm(hf_state: dict, n_layers: int) -> dict:
    d, best = "decoder.model.decoder.", {}
    for k in range(4):
        best[f"emb.{k}.weight"] = hf_state[f"{d}embed_tokens.{k}.weight"]
        best[f"linears.{k}.weight"] = hf_state[f"decoder.lm_heads.{k}.weight"]
    for i in range(n_layers):
        h, a = f"{d}layers.{i}.", f"transformer.layers.{i}."
        for theirs, ours in [("self_attn", "self_attn"), ("encoder_attn", "cross_attention")]:
            best[a + ours + ".in_proj_weight"] = torch.cat([hf_state[f"{h}{theirs}.{p}_proj.weight"] for p in "qkv"])
            best[a + ours + ".out_proj.weight"] = hf_state[f"{h}{theirs}.out_proj.weight"]
        for theirs, ours in [("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm_cross"), ("final_layer_norm", "norm2")]:
            for p in ("weight", "bias"):
                best[f"{a}{ours}.{p}"] = hf_state[f"{h}{theirs}.{p}"]
        best[a + "linear1.weight"], best[a + "linear2.weight"] = hf_state[h + "fc1.weight"], hf_state[h + "fc2.weight"]
    for p in ("weight", "bias"):
        best[f"out_norm.{p}"] = hf_state[f"{d}layer_norm.{p}"]
        best[f"condition_provider.conditioners.description.output_proj.{p}"] = hf_state[f"enc_to_dec_proj.{p}"]
    return best


def audiocraft_codec(codec_state: dict) -> dict:
    """transformers EncodecModel keys -> audiocraft names, with the old weight_g / weight_v norm names."""
    out = {}
    for key, value in codec_state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        part, rest = key.split(".", 1)
        if part == "quantizer":
            key = "quantizer.vq." + rest.replace(".codebook.", "._codebook.")
        else:
            _, j, sub = rest.split(".", 2)
            if sub.startswith("conv.") and part == "decoder" and value.dim() == 3 and _is_transposed(codec_state, j):
                sub = "convtr.convtr." + sub[len("conv."):]
            elif sub.startswith("conv."):
                sub = "conv.conv." + sub[len("conv."):]
            elif sub.startswith(("block.", "shortcut.")):
                head, tail = sub.split(".conv.", 1)
                sub = f"{head}.conv.conv.{tail}"
            key = f"{part}.model.{j}.{sub}"
        out[key] = value
    return out


def _is_transposed(codec_state, j):
    # in the decoder, the convs between the first and the last are the transposed upsampling convs
    convs = sorted({int(k.split(".")[2]) for k in codec_state if k.startswith("decoder.layers.") and k.split(".")[3] == "conv"})
    return int(j) not in (convs[0], convs[-1])


@pytest.fixture(scope="module")
def t5_dir(tiny_hf, tmp_path_factory):
    """t5-base's own folder, in miniature: an encoder saved by transformers plus spiece.model."""
    folder = tmp_path_factory.mktemp("t5")
    tiny_hf[1].text_encoder.save_pretrained(folder)
    shutil.copy(tiny_hf[0] / "spiece.model", folder)
    return folder


@pytest.fixture(scope="module")
def audiocraft_dir(tiny_hf, tmp_path_factory):
    folder, hf = tiny_hf
    out = tmp_path_factory.mktemp("audiocraft")
    state = hf.state_dict()
    lm_cfg = "transformer_lm:\n  num_heads: 4\n  dim: 64\n"  # exported checkpoints store xp.cfg as YAML
    torch.save({"best_state": audiocraft_lm(state, 2), "xp.cfg": lm_cfg, "version": "1.0", "exported": True}, out / "state_dict.bin")
    codec = {k[len("audio_encoder."):]: v for k, v in state.items() if k.startswith("audio_encoder.")}
    codec_cfg = "sample_rate: 32000\nseanet:\n  dilation_base: 2\n  causal: false\n"
    torch.save({"best_state": audiocraft_codec(codec), "xp.cfg": codec_cfg}, out / "compression_state_dict.bin")
    return out


def hf_logits(hf, ours, grid):
    ids, mask = ours.text_encoder.tokenize(PROMPT)
    enc = hf.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    out = hf(encoder_outputs=(enc,), attention_mask=mask.long(), decoder_input_ids=grid.reshape(-1, grid.shape[-1]))
    return out.logits.reshape(*grid.shape, -1)


def our_logits(model, grid, keep=None):
    text, mask = model.text_condition(PROMPT * grid.shape[0])
    return model.lm(grid, text, mask, keep)


def random_grid(n_frames=12, seed=0):
    codes = torch.randint(0, 2048, (1, 4, n_frames), generator=torch.Generator().manual_seed(seed))
    return delay.interleave(codes, 2048)


# ---- audiocraft ---------------------------------------------------------------------------------
@torch.no_grad()
def test_audiocraft_layout_matches_transformers(tiny_hf, audiocraft_dir, t5_dir):
    hf = tiny_hf[1]
    assert detect_layout(str(audiocraft_dir))[0] == "audiocraft"
    ours = MusicGen.from_pretrained(str(audiocraft_dir), t5=str(t5_dir))
    assert (ours.lm.cfg.dim, ours.lm.cfg.n_layers, ours.lm.cfg.n_heads) == (64, 2, 4)  # heads from xp.cfg
    grid = random_grid()
    expected = hf_logits(hf, ours, grid)
    assert expected.abs().max() > 0.1
    assert (our_logits(ours, grid) - expected).abs().max().item() <= TOL
    audio = torch.randn(1, 1, 6400, generator=torch.Generator().manual_seed(1))
    codes = hf.audio_encoder.encode(audio, bandwidth=2.2).audio_codes[0]
    assert torch.equal(ours.codec.encode(audio), codes)
    assert torch.allclose(ours.codec.decode(codes), hf.audio_encoder.decode(codes[None], [None]).audio_values, atol=1e-5)


def test_audiocraft_errors_name_the_problem(tiny_hf, audiocraft_dir, t5_dir, tmp_path):
    broken = tmp_path / "ac"
    shutil.copytree(audiocraft_dir, broken)
    pkg = torch.load(broken / "state_dict.bin", weights_only=True)
    pkg["best_state"].pop("transformer.layers.1.linear2.weight")
    torch.save(pkg, broken / "state_dict.bin")
    with pytest.raises(LoadError, match="missing key transformer.layers.1.linear2.weight"):
        MusicGen.from_pretrained(str(broken), t5=str(t5_dir))
    (broken / "compression_state_dict.bin").unlink()
    shutil.copy(audiocraft_dir / "state_dict.bin", broken)
    with pytest.raises(LoadError, match="compression_state_dict.bin is missing"):
        MusicGen.from_pretrained(str(broken), t5=str(t5_dir))
    shutil.copy(audiocraft_dir / "compression_state_dict.bin", broken)
    with pytest.raises(LoadError, match="not a T5 model folder"):
        MusicGen.from_pretrained(str(broken), t5=str(tiny_hf[0]))  # a MusicGen folder, not t5
