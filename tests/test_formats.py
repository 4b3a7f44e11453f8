"""Checkpoint layouts: audiocraft and official STAGE checkpoints in, transformers and native out.

Each layout is built here from tiny random weights: the audiocraft files from a transformers model
through the key table of docs/original.md#musicgen-and-encodec and audiocraft's SEANet/RVQ names; the STAGE file
from x-transformers 1.26.0 modules set up as the STAGE code sets them up. Logits are compared with
the reference implementation of each layout (transformers, x-transformers).
"""
import shutil
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from stage_min import delay
from stage_min.eval import original
from stage_min.io.convert import main as convert_main
from stage_min.io.formats import detect_layout, export_hf, export_native
from stage_min.io.loading import LoadError
from stage_min.io.pretrained import from_pretrained
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
    ours = from_pretrained(str(audiocraft_dir), t5=str(t5_dir))
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
        from_pretrained(str(broken), t5=str(t5_dir))
    (broken / "compression_state_dict.bin").unlink()
    shutil.copy(audiocraft_dir / "state_dict.bin", broken)
    with pytest.raises(LoadError, match="compression_state_dict.bin is missing"):
        from_pretrained(str(broken), t5=str(t5_dir))
    shutil.copy(audiocraft_dir / "compression_state_dict.bin", broken)
    with pytest.raises(LoadError, match="not a T5 model folder"):
        from_pretrained(str(broken), t5=str(tiny_hf[0]))  # a MusicGen folder, not t5


# ---- official STAGE (x-transformers 1.26.0) ------------------------------------------------------
@pytest.fixture(scope="module")
def stage_ckpt(tiny_hf, tmp_path_factory):
    """(file, decoder, output_proj): an official-layout STAGE checkpoint, saved with a .pt suffix like
    the released ones (the content is safetensors)."""
    hf = tiny_hf[1]
    decoder = original.build_decoder(128, 2, max_seq_len=500)
    torch.manual_seed(1)
    output_proj = nn.Linear(32, 128)
    state = {f"lm.decoder.{k}": v for k, v in decoder.state_dict().items()}
    state.update({f"condition_provider.embedders.description.output_proj.{k}": v for k, v in output_proj.state_dict().items()})
    t5 = hf.text_encoder.state_dict()
    t5.pop("encoder.embed_tokens.weight")  # tied to shared.weight: safetensors keeps one of the two
    state.update({f"condition_provider.embedders.description.t5.{k}": v for k, v in t5.items()})
    codec = {k[len("audio_encoder."):]: v for k, v in hf.state_dict().items() if k.startswith("audio_encoder.")}
    state.update({f"encodec_model.{k}": v for k, v in audiocraft_codec(codec).items()})
    path = tmp_path_factory.mktemp("stage") / "stage-drums-ckp1.pt"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, decoder, output_proj


def stage_rows(model, n_context=5, n_target=6):
    """Row 0: context + text. Row 1: the unconditional row of guidance (no context, no text)."""
    frames = torch.randint(0, 2048, (2, 4, n_context + n_target), generator=torch.Generator().manual_seed(3))
    seq = build_sequence(frames[:, :, :n_context], frames[:, :, n_context:], n_target, 2048, 2049,
                         drop_context=torch.tensor([False, True]))
    text, mask = model.text_condition(PROMPT)
    return seq, torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)])


@torch.no_grad()
def test_stage_checkpoint_matches_x_transformers(stage_ckpt, tiny_hf, t5_dir):
    path, decoder, output_proj = stage_ckpt
    assert detect_layout(str(path)) == ("stage", path)
    ours = from_pretrained(str(path), t5=str(t5_dir))
    cfg = ours.lm.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_in) == (128, 2, 2, 2050)
    assert cfg.zero_special_row and not cfg.attend_start_step
    seq, text, text_mask = stage_rows(ours)
    got = ours.lm(seq.grid, text, text_mask, seq.keep)
    ids, mask = ours.text_encoder.tokenize(PROMPT)
    states = tiny_hf[1].text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ref_text = output_proj(states) * mask[..., None]
    expected, stage_keep = original.logits(decoder, seq.grid, torch.cat([ref_text, torch.zeros_like(ref_text)]), text_mask)
    # STAGE's mask is ours (prefix builder) minus the start step
    ours_keep = seq.keep.clone()
    ours_keep[:, 0] = False
    assert torch.equal(stage_keep, ours_keep)
    assert expected.abs().max() > 0.1
    kept = stage_keep[:, None, :, None].expand_as(got)  # dropped steps are seen by nobody: not compared
    assert (got - expected)[kept].abs().max().item() <= TOL
    assert (got[0] - got[1])[kept[0]].abs().max() > 1e-3  # context and text matter
    # the cached path (prefill + decode steps) applies the same start-step rule
    first = int(seq.target[0, 0].nonzero()[0])
    ours.lm.setup_cache(2, seq.grid.shape[-1], text, text_mask)
    steps = [ours.lm.prefill(seq.grid[:, :, :first], seq.keep[:, :first])]
    for s in range(first, seq.grid.shape[-1] - 1):
        steps.append(ours.lm.decode_step(seq.grid[:, :, s:s + 1], torch.tensor([s])))
    ours.lm.clear_cache()
    cached = torch.stack(steps, dim=2)
    assert (cached - got[:, :, first - 1:-1]).abs().max().item() <= TOL


@torch.no_grad()
def test_original_sampling_loop_and_ours_pick_the_same_tokens(stage_ckpt, tiny_hf, t5_dir):
    """With top-k 1 (no randomness), the original's loop (the whole sequence re-run at every step, no
    cache) and our cached sampler fill a STAGE grid with the same tokens: bench.py --mode stage times
    the same work on both sides."""
    from stage_min.generate import SamplingConfig, generate_tokens
    from stage_min.stage import generation_rows

    path, decoder, output_proj = stage_ckpt
    ours = from_pretrained(str(path), t5=str(t5_dir))
    context = torch.randint(0, 2048, (1, 4, 7), generator=torch.Generator().manual_seed(5))
    grid, known, keep, _ = generation_rows(context, torch.tensor([7]), 9, 2048, 2049, guidance=True)
    text, mask = ours.text_condition(PROMPT)
    sc = SamplingConfig(cfg_coef=3.0, top_k=1)
    got = generate_tokens(ours.lm, grid, known, text, mask, sc, keep=keep)
    ids, tmask = ours.text_encoder.tokenize(PROMPT)
    ref_text = output_proj(tiny_hf[1].text_encoder(input_ids=ids, attention_mask=tmask.long()).last_hidden_state) * tmask[..., None]
    expected = original.generate(decoder, grid, known, ref_text, tmask, sc)
    sampled = ~known[:1]
    assert sampled.sum() >= 9 * 4 - 6
    assert torch.equal(got[sampled], expected[sampled])
    assert not torch.equal(got[sampled], torch.zeros_like(got[sampled]))


@torch.no_grad()
def test_stage_exports_native_not_hf(stage_ckpt, t5_dir, tmp_path):
    ours = from_pretrained(str(stage_ckpt[0]), t5=str(t5_dir))
    export_native(ours, tmp_path / "native")
    again = from_pretrained(str(tmp_path / "native"))  # self-contained: no t5, no base
    assert again.lm.cfg == ours.lm.cfg
    seq, text, text_mask = stage_rows(ours)
    assert torch.equal(again.lm(seq.grid, text, text_mask, seq.keep), ours.lm(seq.grid, text, text_mask, seq.keep))
    with pytest.raises(LoadError, match="only plain MusicGen"):
        export_hf(ours, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # a folder holding the one checkpoint file is accepted too
    folder = tmp_path / "stage_folder"
    folder.mkdir()
    shutil.copy(stage_ckpt[0], folder)
    assert detect_layout(str(folder))[0] == "stage"


# ---- every mapped tensor matters ------------------------------------------------------------------
def alike(state: dict) -> list:
    """The problems of an LM state as a test model: a tensor whose elements are all equal (a LayerNorm
    left at 1 or 0, a zero bias), or one equal to another tensor of its shape. Either way a key table
    could map it to the wrong key, or drop it for the init's value, and no logit would change."""
    problems, seen = [], {}
    for key, value in state.items():
        if not value.is_floating_point() or value.numel() < 2:
            continue
        if bool((value == value.flatten()[0]).all()):
            problems.append(f"{key} is constant")
        for other in seen.get(tuple(value.shape), []):
            if torch.equal(state[other], value):
                problems.append(f"{key} equals {other}")
        seen.setdefault(tuple(value.shape), []).append(key)
    return problems


@pytest.mark.parametrize("layout", ["transformers", "audiocraft", "stage", "native"])
def test_test_models_have_no_constant_or_repeated_tensors(layout, tiny_hf, audiocraft_dir, stage_ckpt, stage_run, t5_dir):
    """The parity tests above (and test_musicgen's, test_loading's) compare logits within 1e-4: they
    see a key-table mistake only if every tensor the table maps is unlike the others. With
    transformers' init (LayerNorms 1 / 0, enc_to_dec_proj.bias 0) a swapped norm_self <-> norm_ffn
    passed them all; the tiny models now randomise those (tiny.randomise_constants)."""
    model = {"transformers": lambda: from_pretrained(str(tiny_hf[0])),
             "audiocraft": lambda: from_pretrained(str(audiocraft_dir), t5=str(t5_dir)),
             "stage": lambda: from_pretrained(str(stage_ckpt[0]), t5=str(t5_dir)),
             "native": lambda: from_pretrained(str(stage_run))}[layout]()
    state = model.lm.state_dict()
    assert any(".norm_" in k for k in state) and "text_proj.bias" in state
    assert alike(state) == []
    if layout == "transformers":  # the T5 encoder's norms too (its embedding is tied: shared twice)
        assert [p for p in alike(model.text_encoder.state_dict()) if "constant" in p] == []


@torch.no_grad()
def test_a_swapped_norm_changes_the_logits(tiny_hf):
    """What the parity tests rely on, shown directly: swapping two LayerNorms of a layer (the
    mistake a key table can make) moves the logits far beyond the 1e-4 tolerance."""
    model = from_pretrained(str(tiny_hf[0]))
    grid = random_grid()
    before = our_logits(model, grid)
    layer = model.lm.layers[0]
    for p in ("weight", "bias"):
        a, b = getattr(layer.norm_self, p), getattr(layer.norm_ffn, p)
        a_old = a.clone()
        a.copy_(b)
        b.copy_(a_old)
    assert (our_logits(model, grid) - before).abs().max() > 100 * TOL
    model.lm.text_proj.bias.zero_()  # a dropped projection bias (left at its init) too
    assert (our_logits(model, grid) - before).abs().max() > 100 * TOL


class NotATensor:
    """Stands for anything a Lightning checkpoint may pickle besides tensors (hyper-parameters, ...)."""


@pytest.fixture(scope="module")
def stage_reference(stage_ckpt, t5_dir):
    """The safetensors STAGE file's model, rows and logits, to compare every other file form with."""
    model = from_pretrained(str(stage_ckpt[0]), t5=str(t5_dir))
    seq, text, text_mask = stage_rows(model)
    with torch.no_grad():
        return seq, text, text_mask, model.lm(seq.grid, text, text_mask, seq.keep)


@pytest.mark.parametrize("name, form", [
    ("stage-drums.pt", "state dict"),
    ("stage-drums.safetensors", "state dict"),  # a pickle whatever the suffix says
    ("stage-drums.ckpt", "lightning"),
    ("stage-drums-legacy.pt", "legacy pickle"),
])
@torch.no_grad()
def test_stage_checkpoint_in_every_file_form_gives_the_same_logits(name, form, stage_ckpt, stage_reference, t5_dir, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(stage_ckpt[0]))
    path = tmp_path / name
    if form == "lightning":
        torch.save({"state_dict": state, "epoch": 3, "global_step": 12000, "optimizer_states": []}, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=form != "legacy pickle")
    assert detect_layout(str(path)) == ("stage", path)
    model = from_pretrained(str(path), t5=str(t5_dir))
    assert model.layout == "stage" and model.lm.cfg.zero_special_row and not model.lm.cfg.attend_start_step
    seq, text, text_mask, expected = stage_reference
    assert torch.equal(model.lm(seq.grid, text, text_mask, seq.keep), expected)


def test_stage_pickle_with_objects_is_refused_not_run(stage_ckpt, t5_dir, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "stage-drums.ckpt"
    torch.save({"state_dict": load_file(str(stage_ckpt[0])), "hyper_parameters": NotATensor()}, path)
    with pytest.raises(LoadError, match=r"stage-drums\.ckpt: refused: the pickle asks for test_formats\.NotATensor") as e:
        from_pretrained(str(path), t5=str(t5_dir))
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(LoadError, match="not a STAGE checkpoint"):
        detect_layout(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(LoadError, match="not a STAGE checkpoint"):
        detect_layout(str(other))


# ---- export to transformers ---------------------------------------------------------------------
@torch.no_grad()
def test_export_hf_reloads_in_transformers(audiocraft_dir, t5_dir, tmp_path):
    from transformers import MusicgenForConditionalGeneration

    ours = from_pretrained(str(audiocraft_dir), t5=str(t5_dir))
    export_hf(ours, tmp_path / "hf")
    hf = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    grid = random_grid(seed=5)
    expected = our_logits(ours, grid)
    assert (hf_logits(hf, ours, grid) - expected).abs().max().item() <= TOL
    assert (our_logits(from_pretrained(str(tmp_path / "hf")), grid) - expected).abs().max().item() <= TOL
    audio = torch.randn(1, 1, 6400, generator=torch.Generator().manual_seed(2))
    assert torch.equal(hf.audio_encoder.encode(audio, bandwidth=2.2).audio_codes[0], ours.codec.encode(audio))
    # transformers' generate() gets MusicGen's sampling defaults, and the files ordinary permissions
    assert hf.generation_config.do_sample and hf.generation_config.guidance_scale == 3.0
    assert hf.generation_config.decoder_start_token_id == 2048
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "hf").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


# ---- the converter command ----------------------------------------------------------------------
def test_convert_cli_end_to_end(audiocraft_dir, t5_dir, tmp_path):
    dst = tmp_path / "native"
    run = subprocess.run([sys.executable, "-m", "stage_min.io.convert", str(audiocraft_dir), str(dst), "--t5", str(t5_dir)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "audiocraft -> native" in run.stdout
    grid = random_grid(seed=7)
    expected = our_logits(from_pretrained(str(audiocraft_dir), t5=str(t5_dir)), grid)
    assert torch.equal(our_logits(from_pretrained(str(dst)), grid), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.npz").write_bytes(b"x")
    run = subprocess.run([sys.executable, "-m", "stage_min.io.convert", str(junk), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "unrecognised checkpoint layout" in run.stderr and "weights.npz" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["{ac}", "{dst_full}"], "already exists and is not an empty folder"),
    (["{stage}", "{dst}", "--to", "hf"], "only plain MusicGen"),
    (["{ac}", "{dst}", "--to", "onnx"], "invalid choice"),
    (["{nowhere}", "{dst}"], "not found"),
    (["{spiece}", "{dst}"], "not a STAGE checkpoint"),
])
def test_convert_cli_errors(args, message, audiocraft_dir, stage_ckpt, t5_dir, tiny_hf, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    paths = {"ac": audiocraft_dir, "stage": stage_ckpt[0], "dst": tmp_path / "dst", "dst_full": tmp_path / "full",
             "nowhere": tmp_path / "nowhere", "spiece": tiny_hf[0] / "spiece.model"}
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args] + ["--t5", str(t5_dir)]
    try:
        code = convert_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "dst").exists()
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
