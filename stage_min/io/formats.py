"""Checkpoint layouts: which one a path holds, reading each into one common form, writing ours.

Four layouts come in (docs/checkpoints.md):
- "hf": transformers' MusicGen folder (config.json with a "decoder" section, safetensors or .bin);
- "native": ours (config.json with "format": "stage_min");
- "audiocraft": a folder with state_dict.bin (LM) and compression_state_dict.bin (EnCodec); t5-base
  comes from its own folder or hub id;
- "stage": the official STAGE checkpoints, one file of the whole Lightning module of
  github.com/giorgioskij/stage, safetensors or a pickled state dict (optionally inside Lightning's
  {"state_dict": ...}), told apart by content, not suffix: an x-transformers 1.26.0 LM under "lm.decoder.",
  audiocraft-named EnCodec under "encodec_model.", T5 and the text projection under
  "condition_provider.embedders.description.". The T5 config and tokenizer come from the t5 folder.

Each is read into a `Checkpoint`: our LM config and state, plus a transformers-style config with
"text_encoder"/"audio_encoder" sections and their weights under those prefixes, and the folder of
spiece.model. Two ways out: `export_hf` (plain MusicGen only) and `export_native` (self-contained).
"""
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .loading import (LoadError, add_context_token, gather, is_native, name_first, lm_config_from_hf, lm_config_from_native, lm_state_from_hf, lm_state_to_hf, with_default_mode, read_config, read_state_dict, resolve_model_dir, safe_torch_load, submodule_state)
from .lightning_ckpt import restricted_torch_load
from ..model import LMConfig

DEFAULT_T5 = "google-t5/t5-base"  # MusicGen's and STAGE's text encoder
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


@dataclass
class Checkpoint:
    layout: str
    lm_cfg: LMConfig
    lm_state: dict  # our LM keys
    config: dict  # at least "text_encoder" (T5Config dict) and "audio_encoder" (EncodecConfig dict)
    state: dict  # "text_encoder.*" (T5EncoderModel keys) and "audio_encoder.*" (EncodecModel keys)
    spiece_dir: Path  # folder holding spiece.model


# ---- which layout -------------------------------------------------------------------------------
def _file_kind(path: Path) -> str:
    """What a weights file holds, from its first bytes (never from its suffix): "safetensors" (an
    8-byte little-endian header length, then a JSON header), "torch-zip" (torch.save's zip
    archive), "pickle" (torch.save's legacy format), or "" for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2**31:
        return "safetensors"
    return ""


def read_weights_file(path: Path, kind: str | None = None) -> dict:
    """A state dict from a safetensors file or a pickled (torch.save) one, whatever the suffix. A
    Lightning-style {"state_dict": {...}, ...} wrapper is unwrapped. Pickles go through
    loading.safe_torch_load (weights_only); one that pickles objects (the original's training
    `.ckpt`, whose hyper-parameters are dataclasses) is read by lightning_ckpt's restricted
    unpickler, which turns the original's classes into inert records and refuses any other global."""
    kind = kind or _file_kind(path)
    if kind == "safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise LoadError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if kind not in ("torch-zip", "pickle"):
        raise LoadError(f"{path} is neither a safetensors file nor a torch.save file")
    # mmap (zip format only): a 1-2 GB checkpoint is not copied into memory to look at it
    try:
        pkg = safe_torch_load(path, mmap=kind == "torch-zip")
    except LoadError as e:
        if "refused" not in str(e):
            raise
        # the original's training checkpoints pickle their hyper-parameters (dataclasses, paths,
        # enums): read through the restricted unpickler, which refuses anything off its allow-list
        pkg = restricted_torch_load(path, mmap=kind == "torch-zip")
    if isinstance(pkg, dict) and isinstance(pkg.get("state_dict"), dict):  # Lightning checkpoint
        pkg = pkg["state_dict"]
    if not isinstance(pkg, dict) or not all(isinstance(v, torch.Tensor) for v in pkg.values()):
        raise LoadError(f"{path} holds no state dict (a mapping of names to tensors)")
    return pkg


def _is_stage_file(path: Path) -> bool:
    kind = _file_kind(path)
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return any(k.startswith("lm.decoder.") for k in f.keys())
        except Exception as e:  # a header that promises safetensors, then a damaged file
            raise LoadError(f"{path}: a damaged safetensors file (truncated?): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if kind:  # a pickle that cannot be read safely says so (LoadError) rather than "not a STAGE file"
        return any(k.startswith("lm.decoder.") for k in read_weights_file(path, kind))
    return False


def detect_layout(name: str) -> tuple[str, Path]:
    """(layout, path) for a folder, a STAGE checkpoint file, or a hub id; LoadError naming what was found."""
    path = Path(name).expanduser()
    if path.is_file():
        if _is_stage_file(path):
            return "stage", path
        raise LoadError(f"{name} is a file but not a STAGE checkpoint (a safetensors or torch.save file with lm.decoder.* keys); "
                        "the other layouts are folders")
    folder = resolve_model_dir(name)
    if (folder / "config.json").exists():
        config = read_config(folder)
        if is_native(config):
            return "native", folder
        if "decoder" in config:
            return "hf", folder
        raise LoadError(f"{folder / 'config.json'} is neither a transformers MusicGen config (no 'decoder' section) "
                        "nor a stage_min one (no \"format\": \"stage_min\")")
    if (folder / "state_dict.bin").exists():
        return "audiocraft", folder
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    stage_files = [p for p in weights if p.is_file() and _is_stage_file(p)]
    if len(stage_files) == 1:
        return "stage", stage_files[0]
    if len(stage_files) > 1:
        raise LoadError(f"{folder} holds several STAGE checkpoints ({', '.join(p.name for p in stage_files)}); pass one file")
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise LoadError(f"{folder}: unrecognised checkpoint layout: no config.json (transformers or stage_min), no "
                    f"state_dict.bin (audiocraft) and no STAGE safetensors file; found {found}")


def read_checkpoint(name: str, t5: str | None = None) -> Checkpoint:
    """Any supported layout -> Checkpoint. `t5` (folder or hub id) serves the layouts that do not
    bundle t5-base's config and tokenizer (audiocraft, STAGE); default google-t5/t5-base."""
    layout, path = detect_layout(name)
    read = {"hf": _read_hf, "native": _read_native, "audiocraft": _read_audiocraft, "stage": _read_stage}[layout]
    try:
        return read(path, t5)
    except KeyError as e:  # a key the layout needs is not there (in the weights or in config.json)
        raise LoadError(f"{path}: not a complete {layout} checkpoint: missing {e}") from None
    except (ValueError, TypeError, IndexError) as e:  # shapes or settings that describe no valid model
        raise LoadError(f"{path}: not a valid {layout} checkpoint ({type(e).__name__}: {e})") from None


def _no_other_keys(state: dict, prefixes: tuple, where):
    """Strictness at the top level: every stored tensor must belong to a part we load."""
    other = [k for k in state if not k.startswith(prefixes)]
    if other:
        raise LoadError(f"{where}: {name_first('unexpected key', other)}")


# ---- transformers and native ----------------------------------------------------------------------
def _read_hf(folder: Path, t5) -> Checkpoint:
    config, state = read_config(folder), read_state_dict(folder)
    _no_other_keys(state, ("decoder.", "enc_to_dec_proj.", "text_encoder.", "audio_encoder."), folder)
    for part in ("text_encoder", "audio_encoder"):
        if part not in config:
            raise LoadError(f"{folder}/config.json has no '{part}' section")
    cfg = lm_config_from_hf(config, state)
    return Checkpoint("hf", cfg, lm_state_from_hf(state, cfg), config, state, folder)


def _read_native(folder: Path, t5) -> Checkpoint:
    config, state = read_config(folder), read_state_dict(folder)
    _no_other_keys(state, ("lm.", "text_encoder.", "audio_encoder."), folder)
    cfg, lm_state = lm_config_from_native(config), submodule_state(state, "lm.")
    bundled = any(k.startswith(("text_encoder.", "audio_encoder.")) for k in state)
    if bundled and ("text_encoder" not in config or "audio_encoder" not in config):
        raise LoadError(f"{folder} holds text encoder / codec weights but config.json lacks their sections")
    if "lora" in config:  # a LoRA run: adapters and context rows over the base's LM, merged here
        return _merged_lora(folder, config, cfg, lm_state, t5)
    if not bundled:  # T5 + EnCodec come from the base model
        base = config.get("base")
        if not base or not isinstance(base, str):
            raise LoadError(f"{folder}/config.json names no base model for the text encoder and codec")
        if Path(base).is_absolute() and not Path(base).exists():
            raise LoadError(f"{folder}/config.json takes its text encoder and codec from {base}, which no longer exists; "
                            "put that base model back there (or convert the run to a self-contained folder while it exists)")
        folder = resolve_model_dir(base)
        config, state = read_config(folder), read_state_dict(folder)
    return Checkpoint("native", cfg, lm_state, config, state, folder)


# ---- t5-base from its own folder ------------------------------------------------------------------
def _merged_lora(folder: Path, config: dict, cfg: LMConfig, adapters: dict, t5) -> Checkpoint:
    """The base's LM (given the context token) with a LoRA run's adapters merged into it: each
    `<layer>.lora_a.<row>` / `lora_b.<row>` pair adds alpha / rank * B @ A to the weight's rows from <row>
    (train/lora.py names them so), each `<embed>.context_row` replaces the context token's row."""
    base = config.get("base")
    if not isinstance(base, str) or not base:
        raise LoadError(f"{folder}/config.json: a LoRA checkpoint names no base model")
    ckpt = read_checkpoint(base, t5)
    state, base_cfg = add_context_token(ckpt.lm_state, ckpt.lm_cfg)
    if (base_cfg.dim, base_cfg.n_layers, base_cfg.n_codebooks) != (cfg.dim, cfg.n_layers, cfg.n_codebooks):
        raise LoadError(f"{folder}: its adapters were trained on another LM than {base}'s")
    state, scale = {k: v.clone() for k, v in state.items()}, float(config["lora"]["alpha"]) / int(config["lora"]["rank"])
    for key, a in adapters.items():
        layer, kind, row = key.rsplit(".", 2) if ".lora_" in key else (*key.rsplit(".", 1), "")
        if kind == "lora_a":
            b, first = adapters[f"{layer}.lora_b.{row}"], int(row)
            state[f"{layer}.weight"][first:first + b.shape[0]] += scale * (b.float() @ a.float()).to(state[f"{layer}.weight"].dtype)
        elif kind == "context_row":
            state[f"{layer}.weight"][cfg.context_id] = a
        elif kind != "lora_b":
            raise LoadError(f"{folder}: unexpected adapter weight {key}")
    if cfg.zero_special_row:
        for k in range(cfg.n_codebooks):
            state[f"embed.{k}.weight"][cfg.special_id] = 0
    return Checkpoint("native", cfg, state, ckpt.config, ckpt.state, ckpt.spiece_dir)


def _read_t5(t5: str | None, weights: bool = True) -> tuple[dict, dict, Path]:
    """t5-base's config, encoder weights (as text_encoder.*) and folder. Its hub folder holds the whole
    encoder-decoder (T5ForConditionalGeneration); only the encoder and the shared embedding are kept.
    weights=False skips reading them (about 900 MB) when a checkpoint bundles its own T5."""
    folder = resolve_model_dir(t5 or DEFAULT_T5)
    config = read_config(folder)
    if config.get("model_type") != "t5":
        raise LoadError(f"{folder} is not a T5 model folder (config.json model_type is {config.get('model_type')!r})")
    if not weights:
        return config, {}, folder
    state = read_state_dict(folder)
    keep = {f"text_encoder.{k}": v for k, v in state.items() if k.startswith(("encoder.", "shared."))}
    return config, keep, folder


# ---- audiocraft -----------------------------------------------------------------------------------
def _read_pkg(path: Path) -> dict:
    if not path.exists():
        raise LoadError(f"{path} is missing (the audiocraft layout needs state_dict.bin and compression_state_dict.bin)")
    pkg = safe_torch_load(path)  # weights_only: never run pickled code from a downloaded file
    if not isinstance(pkg, dict) or not ("best_state" in pkg or "pretrained" in pkg):
        raise LoadError(f"{path} is not an audiocraft checkpoint (no 'best_state')")
    return pkg


def _xp_cfg(pkg: dict) -> dict:
    """The training config stored with an audiocraft checkpoint: a YAML string (exported) or a dict."""
    xp = pkg.get("xp.cfg")
    if isinstance(xp, str):
        import yaml

        try:
            xp = yaml.safe_load(xp)
        except yaml.YAMLError:
            raise LoadError("the audiocraft checkpoint's xp.cfg is not valid YAML") from None
    return xp if isinstance(xp, dict) else {}


def _count(state: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.fullmatch(k))})


def lm_config_from_audiocraft(best: dict, xp: dict) -> LMConfig:
    """Sizes from the weights; the head count from xp.cfg (not visible in weights), else head dim 64."""
    if "emb.0.weight" not in best or "linears.0.weight" not in best:
        raise LoadError("state_dict.bin has no emb.0.weight / linears.0.weight: not an audiocraft MusicGen LM")
    if "transformer.layers.0.cross_attention.in_proj_weight" not in best:
        raise LoadError("this audiocraft LM has no cross-attention (MusicGen-melody style): not supported")
    rows, dim = best["emb.0.weight"].shape
    card = best["linears.0.weight"].shape[0]
    heads = (xp.get("transformer_lm") or {}).get("num_heads") or dim // 64
    proj = best.get("condition_provider.conditioners.description.output_proj.weight")
    return LMConfig(dim=dim, n_layers=_count(best, r"transformer\.layers\.(\d+)\.norm1\.weight"), n_heads=heads,
                    n_codebooks=_count(best, r"emb\.(\d+)\.weight"), card=card, n_special=rows - card,
                    text_dim=proj.shape[1] if proj is not None else 768, ffn_dim=best["transformer.layers.0.linear1.weight"].shape[0])


def audiocraft_lm_key_table(cfg: LMConfig) -> list[tuple[str, str, slice | None]]:
    """(our key, audiocraft key, rows of it). Fused in_proj rows are q, k, v (docs/original.md#musicgen-and-encodec)."""
    D = cfg.dim
    table = [(f"text_proj.{p}", f"condition_provider.conditioners.description.output_proj.{p}", None) for p in ("weight", "bias")]
    table += [(f"embed.{k}.weight", f"emb.{k}.weight", None) for k in range(cfg.n_codebooks)]
    for i in range(cfg.n_layers):
        o, a = f"layers.{i}.", f"transformer.layers.{i}."
        table += [
            (o + "self_attn.qkv.weight", a + "self_attn.in_proj_weight", None),
            (o + "self_attn.out.weight", a + "self_attn.out_proj.weight", None),
            (o + "cross_attn.q.weight", a + "cross_attention.in_proj_weight", slice(0, D)),
            (o + "cross_attn.kv.weight", a + "cross_attention.in_proj_weight", slice(D, 3 * D)),
            (o + "cross_attn.out.weight", a + "cross_attention.out_proj.weight", None),
            (o + "ffn_in.weight", a + "linear1.weight", None),
            (o + "ffn_out.weight", a + "linear2.weight", None),
        ]
        for ours, theirs in [("norm_self", "norm1"), ("norm_cross", "norm_cross"), ("norm_ffn", "norm2")]:
            table += [(f"{o}{ours}.{p}", f"{a}{theirs}.{p}", None) for p in ("weight", "bias")]
    table += [(f"norm_out.{p}", f"out_norm.{p}", None) for p in ("weight", "bias")]
    table += [(f"heads.{k}.weight", f"linears.{k}.weight", None) for k in range(cfg.n_codebooks)]
    return table


def _apply_table(state: dict, table, what: str) -> dict:
    ours = {}
    for key, src, rows in table:
        if src not in state:
            raise LoadError(f"{what}: missing key {src}")
        ours[key] = state[src] if rows is None else state[src][rows]
    used = {src for _, src, _ in table}
    extra = [k for k in state if k not in used]
    if extra:
        raise LoadError(f"{what}: {name_first('unexpected key', extra)}")
    return ours


# audiocraft's SEANet/RVQ names -> transformers' EncodecModel names. The layer indices are the same
# (both follow the same Sequential order); only wrapper modules are named differently.
ENCODEC_RENAMES = [
    (re.compile(r"^(encoder|decoder)\.model\.(\d+)\.conv\.conv\."), r"\1.layers.\2.conv."),
    (re.compile(r"^decoder\.model\.(\d+)\.convtr\.convtr\."), r"decoder.layers.\1.conv."),
    (re.compile(r"^(encoder|decoder)\.model\.(\d+)\.(block\.\d+|shortcut)\.conv\.conv\."), r"\1.layers.\2.\3.conv."),
    (re.compile(r"^(encoder|decoder)\.model\.(\d+)\.lstm\."), r"\1.layers.\2.lstm."),
    (re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\."), r"quantizer.layers.\1.codebook."),
]


def encodec_state_from_audiocraft(best: dict, what: str) -> dict:
    out = {}
    for key, value in best.items():
        for rx, repl in ENCODEC_RENAMES:
            new, n = rx.subn(repl, key)
            if n:
                out[new] = value
                break
        else:
            raise LoadError(f"{what}: unexpected key {key}")
    return out


def _conv_shape(state: dict, prefix: str):
    for name in ("weight_v", "parametrizations.weight.original1", "weight"):
        if f"{prefix}.{name}" in state:
            return state[f"{prefix}.{name}"].shape
    return None


def encodec_config_from_weights(state: dict, xp: dict) -> dict:
    """An EncodecConfig dict for transformers-named EnCodec weights. Every size is read off a weight
    shape (a downsampling conv has kernel 2 * ratio); what weights do not show (sample rate,
    causality, dilation) comes from xp.cfg, else MusicGen's 32 kHz values (docs/original.md#musicgen-and-encodec)."""
    from transformers import EncodecConfig

    convs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"encoder\.layers\.(\d+)\.conv\.(bias)", k)))
    if len(convs) < 3 or "quantizer.layers.0.codebook.embed" not in state:
        raise LoadError("compression_state_dict.bin does not look like a SEANet EnCodec (no encoder convs or codebooks)")
    first, last, down = convs[0], convs[-1], convs[1:-1]
    filters, channels, kernel = _conv_shape(state, f"encoder.layers.{first}.conv")
    hidden, _, last_kernel = _conv_shape(state, f"encoder.layers.{last}.conv")
    ratios = [_conv_shape(state, f"encoder.layers.{j}.conv")[2] // 2 for j in down]
    res_hidden, _, res_kernel = _conv_shape(state, f"encoder.layers.{first + 1}.block.1.conv")
    bins, dim = state["quantizer.layers.0.codebook.embed"].shape
    n_q = _count(state, r"quantizer\.layers\.(\d+)\.codebook\.embed")
    seanet = xp.get("seanet") or {}
    sample_rate = xp.get("sample_rate", 32000)
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    config = EncodecConfig(
        sampling_rate=sample_rate, audio_channels=channels, num_filters=filters, hidden_size=hidden, kernel_size=kernel,
        last_kernel_size=last_kernel, residual_kernel_size=res_kernel, compress=filters // res_hidden,
        num_residual_layers=down[0] - first - 2, upsampling_ratios=list(reversed(ratios)),
        num_lstm_layers=_count(state, r"encoder\.layers\.\d+\.lstm\.weight_ih_l(\d+)"),
        use_conv_shortcut=any(".shortcut." in k for k in state), dilation_growth_rate=seanet.get("dilation_base", 2),
        use_causal_conv=bool(seanet.get("causal", False)), pad_mode=seanet.get("pad_mode", "reflect"), normalize=False,
        codebook_size=bins, codebook_dim=dim, target_bandwidths=[n_q * math.log2(bins) * frame_rate / 1000],
        chunk_length_s=None, overlap=None,
    )
    if config.num_quantizers != n_q:
        raise LoadError(f"EnCodec with {n_q} codebooks of {bins} codes has no transformers bandwidth setting")
    return config.to_dict()


def _codec_from_audiocraft(best: dict, xp: dict, what: str) -> tuple[dict, dict]:
    state = encodec_state_from_audiocraft(best, what)
    return encodec_config_from_weights(state, xp), {f"audio_encoder.{k}": v for k, v in state.items()}


def _read_audiocraft(folder: Path, t5) -> Checkpoint:
    pkg = _read_pkg(folder / "state_dict.bin")
    best = pkg.get("best_state")
    if not isinstance(best, dict):
        raise LoadError(f"{folder / 'state_dict.bin'} has no LM weights ('best_state')")
    cfg = lm_config_from_audiocraft(best, _xp_cfg(pkg))
    lm_state = _apply_table(best, audiocraft_lm_key_table(cfg), "LM weights (state_dict.bin)")
    codec_pkg = _read_pkg(folder / "compression_state_dict.bin")
    if "pretrained" in codec_pkg:  # only a reference to a published codec, e.g. facebook/encodec_32khz
        codec_dir = resolve_model_dir(codec_pkg["pretrained"])
        codec_config = read_config(codec_dir)
        codec_state = {f"audio_encoder.{k}": v for k, v in read_state_dict(codec_dir).items()}
    else:
        codec_config, codec_state = _codec_from_audiocraft(codec_pkg["best_state"], _xp_cfg(codec_pkg), "codec weights (compression_state_dict.bin)")
    t5_config, t5_state, t5_dir = _read_t5(t5)
    return Checkpoint("audiocraft", cfg, lm_state, {"text_encoder": t5_config, "audio_encoder": codec_config},
                      {**t5_state, **codec_state}, t5_dir)


# ---- official STAGE (x-transformers 1.26.0) --------------------------------------------------------
STAGE_LM, STAGE_TEXT, STAGE_CODEC = "lm.decoder.", "condition_provider.embedders.description.", "encodec_model."


def stage_lm_key_table(cfg: LMConfig) -> list[tuple[str, list[str]]]:
    """(our key, [STAGE keys concatenated along dim 0]). x-transformers numbers the sublayers of a
    cross-attending decoder 3i (self-attention), 3i+1 (cross-attention), 3i+2 (feed-forward); each
    is [norms (pre-norm first), block, residual]."""
    x = STAGE_LM + "attn_layers."
    table = [(f"text_proj.{p}", [f"{STAGE_TEXT}output_proj.{p}"]) for p in ("weight", "bias")]
    table += [(f"embed.{k}.weight", [f"{STAGE_LM}token_emb.emb.{k}.weight"]) for k in range(cfg.n_codebooks)]
    for i in range(cfg.n_layers):
        o, sa, ca, ff = f"layers.{i}.", f"{x}layers.{3 * i}.", f"{x}layers.{3 * i + 1}.", f"{x}layers.{3 * i + 2}."
        table += [
            (o + "self_attn.qkv.weight", [sa + f"1.to_{p}.weight" for p in "qkv"]),
            (o + "self_attn.out.weight", [sa + "1.to_out.weight"]),
            (o + "cross_attn.q.weight", [ca + "1.to_q.weight"]),
            (o + "cross_attn.kv.weight", [ca + "1.to_k.weight", ca + "1.to_v.weight"]),
            (o + "cross_attn.out.weight", [ca + "1.to_out.weight"]),
            (o + "ffn_in.weight", [ff + "1.ff.0.0.weight"]),
            (o + "ffn_out.weight", [ff + "1.ff.2.weight"]),
        ]
        for ours, theirs in [("norm_self", sa), ("norm_cross", ca), ("norm_ffn", ff)]:
            table += [(f"{o}{ours}.{p}", [f"{theirs}0.0.{p}"]) for p in ("weight", "bias")]
    table += [(f"norm_out.{p}", [f"{x}final_norm.{p}"]) for p in ("weight", "bias")]
    table += [(f"heads.{k}.weight", [f"{STAGE_LM}to_logits.linears.{k}.weight"]) for k in range(cfg.n_codebooks)]
    return table


def lm_config_from_stage(state: dict) -> LMConfig:
    rows, dim = state[f"{STAGE_LM}token_emb.emb.0.weight"].shape
    card = state[f"{STAGE_LM}to_logits.linears.0.weight"].shape[0]
    q_rows = state[f"{STAGE_LM}attn_layers.layers.0.1.to_q.weight"].shape[0]
    if q_rows != dim:
        raise LoadError(f"STAGE LM: attention width {q_rows} != model width {dim}; only heads * 64 == dim is supported")
    return LMConfig(
        dim=dim, n_layers=_count(state, rf"{re.escape(STAGE_LM)}attn_layers\.layers\.(\d+)\.1\.to_q\.weight") // 2,
        n_heads=dim // 64,  # the STAGE code fixes attn_dim_head=64
        n_codebooks=_count(state, rf"{re.escape(STAGE_LM)}token_emb\.emb\.(\d+)\.weight"), card=card, n_special=rows - card,
        text_dim=state[f"{STAGE_TEXT}output_proj.weight"].shape[1],
        ffn_dim=state[f"{STAGE_LM}attn_layers.layers.2.1.ff.0.0.weight"].shape[0],
        zero_special_row=True, attend_start_step=False,
    )


def _read_stage(path: Path, t5) -> Checkpoint:
    state = read_weights_file(path)
    for needed in (f"{STAGE_LM}token_emb.emb.0.weight", f"{STAGE_TEXT}output_proj.weight"):
        if needed not in state:
            raise LoadError(f"STAGE checkpoint {path.name}: missing key {needed}")
    cfg = lm_config_from_stage(state)
    lm_part = {k: v for k, v in state.items() if k.startswith((STAGE_LM, STAGE_TEXT + "output_proj."))}
    lm_state = gather(lm_part, stage_lm_key_table(cfg), f"STAGE checkpoint {path.name}")
    codec_best = submodule_state(state, STAGE_CODEC)
    if not codec_best:
        raise LoadError(f"STAGE checkpoint {path.name} has no EnCodec weights ({STAGE_CODEC}*)")
    codec_config, codec_state = _codec_from_audiocraft(codec_best, {}, f"STAGE checkpoint {path.name}: codec weights")
    bundled_t5 = {f"text_encoder.{k}": v for k, v in submodule_state(state, STAGE_TEXT + "t5.").items()}
    t5_config, t5_state, t5_dir = _read_t5(t5, weights=not bundled_t5)
    known = (STAGE_LM, STAGE_CODEC, STAGE_TEXT + "t5.", STAGE_TEXT + "output_proj.")
    extra = list(lm_part) + [k for k in state if not k.startswith(known)]
    if extra:
        raise LoadError(f"STAGE checkpoint {path.name}: {name_first('unexpected key', extra)}")
    # the checkpoint bundles the (frozen) T5 it ran with: prefer it to the separate folder's weights
    return Checkpoint("stage", cfg, lm_state, {"text_encoder": t5_config, "audio_encoder": codec_config},
                      {**(bundled_t5 or t5_state), **codec_state}, t5_dir)


# ---- writing ----------------------------------------------------------------------------------------
def check_new_folder(dst):
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise LoadError(f"{dst} already exists and is not an empty folder; choose a new output path")


def _write_folder(dst: Path, fill):
    """fill(tmp_folder), then rename it to dst: a failure never leaves a half-written dst."""
    dst = Path(dst)
    check_new_folder(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        fill(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            with_default_mode(path)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parts(model) -> tuple[dict, dict, bytes]:
    """Text encoder + codec of a loaded MusicGen: transformers-prefixed weights, configs, spiece.model bytes."""
    t5, codec = model.text_encoder.t5, model.codec.model
    weights = {f"text_encoder.{k}": v for k, v in t5.state_dict().items()}
    weights.update({f"audio_encoder.{k}": v for k, v in codec.state_dict().items()})
    weights = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    weights.pop("text_encoder.encoder.embed_tokens.weight", None)  # tied to text_encoder.shared.weight: stored once
    configs = {"text_encoder": t5.config.to_dict(), "audio_encoder": codec.config.to_dict()}
    return weights, configs, model.text_encoder.sp.serialized_model_proto()


def export_native(model, dst, extra: dict | None = None, dtype: str = "float32"):
    """Our layout, self-contained: LM + T5 + EnCodec weights, their configs and spiece.model.
    dtype "float16" halves the file (weights are loaded back as float32, or the dtype asked for)."""
    from ..generate import SamplingConfig
    from .loading import save_native

    weights, configs, spiece = _parts(model)
    # the model's own sampling settings where they differ from the defaults (pipeline.recommended_sampling)
    changed = getattr(model, "sampling", SamplingConfig()).changed()
    extra = {**({"sampling": changed} if changed else {}), **(extra or {})}
    lm_state = {k: v.detach().float() for k, v in model.lm.state_dict().items()}
    if dtype != "float32":
        to = getattr(torch, dtype)
        lm_state = {k: v.to(to) for k, v in lm_state.items()}
        weights = {k: v.to(to) if v.is_floating_point() else v for k, v in weights.items()}

    def fill(tmp):
        save_native(tmp, lm_state, model.lm.cfg, base=None, extra=extra, more_weights=weights, more_config=configs)
        (tmp / "spiece.model").write_bytes(spiece)

    _write_folder(dst, fill)


def export_hf(model, dst):
    """transformers' MusicGen layout (MusicgenForConditionalGeneration.from_pretrained loads it).
    Only plain MusicGen fits: transformers has no context token and no STAGE masking."""
    from transformers import GenerationConfig, MusicgenConfig, MusicgenDecoderConfig

    cfg = model.lm.cfg
    if cfg.n_special != 1 or cfg.zero_special_row or not cfg.attend_start_step:
        raise LoadError("only plain MusicGen models can be exported to the transformers layout (this one has STAGE's "
                        "context token or masking, which transformers' MusicGen lacks); use --to native")
    weights, configs, spiece = _parts(model)
    weights.update({k: v.detach().float().cpu().contiguous() for k, v in lm_state_to_hf(model.lm.state_dict(), cfg).items()})
    decoder = MusicgenDecoderConfig(vocab_size=cfg.card, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                                    num_attention_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, num_codebooks=cfg.n_codebooks)
    config = MusicgenConfig(text_encoder=configs["text_encoder"], audio_encoder=configs["audio_encoder"], decoder=decoder.to_dict())

    # MusicGen's sampling defaults, as the facebook/musicgen-* repos ship them: without this file
    # transformers' generate() would decode greedily, without guidance, for 20 steps
    generation = GenerationConfig(do_sample=True, guidance_scale=3.0, top_k=250, max_length=1500,
                                  bos_token_id=cfg.card, pad_token_id=cfg.card, decoder_start_token_id=cfg.card)

    def fill(tmp):
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / "spiece.model").write_bytes(spiece)
        generation.save_pretrained(tmp)

    _write_folder(dst, fill)
