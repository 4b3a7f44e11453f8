"""Weights in, weights out: model folders, the hub, and key remapping onto our module names.

Every load is strict: a missing key, an unexpected key or a wrong shape raises `LoadError`
naming it. Nothing is ever loaded partially.
"""
import json
import math
import os
import re
import stat
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model import LMConfig

WEIGHTS_DIR = Path(os.environ.get("STAGE_MIN_WEIGHTS", Path(__file__).resolve().parents[2] / "weights"))
HUB_FILES = ["*.json", "*.safetensors", "spiece.model"]


class LoadError(Exception):
    """A model could not be found or loaded; the message says what and where."""


# ---- finding a model folder ---------------------------------------------------------------------
LATEST = "latest"  # in a train.py run folder: the name of the step folder holding the last complete checkpoint


def follow_latest(folder: Path) -> Path:
    """A train.py run folder -> the step folder its `latest` pointer names; any other folder as is."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return Path(folder)
    try:
        name = read_small(pointer, 4096).decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise LoadError(f"cannot read {pointer} ({type(e).__name__})") from None
    if not re.fullmatch(r"step-\d+", name) or not (Path(folder) / name).is_dir():
        raise LoadError(f"{pointer} names {name!r}, which is not a checkpoint folder in {folder}")
    return Path(folder) / name


def resolve_model_dir(name: str) -> Path:
    """A local folder as is (a train.py run: its latest checkpoint); a hub id ("facebook/musicgen-small")
    from weights/, else downloaded there."""
    path = Path(name).expanduser()
    if path.is_dir():
        return follow_latest(path)
    if path.exists():
        raise LoadError(f"{name} is a file; --model wants a folder or a hub id")
    parts = name.split("/")
    if len(parts) != 2 or name.startswith((".", "/", "~")) or not all(parts):
        raise LoadError(f"model folder {name} not found")
    local = WEIGHTS_DIR / name.replace("/", "--")  # the owner too: a fine-tune may share the repo name
    if (local / "config.json").exists() and has_weights(local):  # else a download was cut short: resume it
        return local
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=name, local_dir=local, allow_patterns=HUB_FILES)
    except Exception as e:  # offline, unknown repo, gated, disk full: all end the same way
        raise LoadError(
            f"could not download {name} ({type(e).__name__}); when offline, put its files in {local} "
            f"(hf download {name} --local-dir {local})"
        ) from None
    return local


def has_weights(folder: Path) -> bool:
    index = next((folder / i for i in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (folder / i).exists()), None)
    if index is not None:
        try:
            return all((folder / shard).exists() for shard in read_json(index)["weight_map"].values())
        except (LoadError, ValueError, KeyError, AttributeError, TypeError):
            return False
    return (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists()


# ---- reading files ------------------------------------------------------------------------------
MAX_TEXT_BYTES = 64 << 20  # config.json, an index, beats.txt, a pointer: small files; anything bigger is not one


def check_regular(path: Path) -> os.stat_result:
    """A regular file (symlinks followed), else LoadError: a FIFO blocks, /dev/zero never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LoadError(f"{Path(path).parent} has no {Path(path).name}") from None
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise LoadError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it")
    return st


def read_small(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; LoadError for anything else. The file is
    opened without blocking and checked on its descriptor (a path swapped after the check is still
    caught), and never more than limit + 1 bytes are read."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LoadError(f"{path} is not a regular file (a device, FIFO or socket); refusing to read it")
        if st.st_size > limit:
            raise LoadError(f"{path} is {st.st_size / 2**20:.1f} MiB, too large for this kind of file (at most {limit >> 20} MiB)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise LoadError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise LoadError(f"{path} grew past {limit >> 20} MiB while being read")
    return data


def safe_torch_load(path: Path, legacy_numpy: bool = False, mmap: bool = False):
    """torch.load that never runs pickled code (weights_only=True): tensors, numbers, strings and
    containers only. A file that pickles anything else is refused in one line (torch's warnings
    about pickle protocols are silenced: the error says it all). legacy_numpy also reads numpy
    arrays (the RNG state in train_state.pt of runs saved before step folders); still no code runs.
    mmap (torch.save's zip format only) maps the tensors rather than copying a large file into memory.
    The file is opened here, so its suffix never decides how torch reads it."""
    import numpy as np

    check_regular(path)
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
               (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct] if legacy_numpy else []
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")
            if mmap and Path(path).suffix != ".safetensors":  # torch.load would hand that name to safetensors
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise LoadError(f"{path}: refused: it pickles Python objects{what}, and loading them could run code; "
                            "only tensors and plain values are read") from None
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {text.splitlines()[0] if text else ''}") from None


def _read_one(path: Path) -> dict:
    check_regular(path)
    if path.suffix != ".safetensors":
        return safe_torch_load(path)
    try:
        return load_file(str(path))
    except Exception as e:
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def read_state_dict(folder: Path) -> dict:
    """The transformers layout: model.safetensors, sharded safetensors + index, or pytorch_model.bin."""
    for single, index in [("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")]:
        if (folder / single).exists():
            return _read_one(folder / single)
        if (folder / index).exists():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise LoadError(f"{folder / index} has no 'weight_map' object of file names")
            state = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).exists():
                    raise LoadError(f"{folder / index} names shard {shard}, which is missing")
                state.update(_read_one(folder / shard))
            return state
    raise LoadError(f"no weights in {folder}: expected model.safetensors, sharded safetensors with an index, or pytorch_model.bin")


def read_json(path: Path, what: str = "JSON object") -> dict:
    """A JSON object from a file; LoadError naming the file for anything else."""
    path = Path(path)
    try:
        value = json.loads(read_small(path).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LoadError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise LoadError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path} holds {type(value).__name__ if value is not None else 'null'}, not a {what}")
    return value


def read_config(folder: Path) -> dict:
    return read_json(Path(folder) / "config.json")


# ---- strict loading -----------------------------------------------------------------------------
def name_first(label: str, keys: list) -> str:
    """'unexpected key a.b (and 3 more)': the first offender by name, the rest counted."""
    return f"{label} {keys[0]}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def load_strict(module: torch.nn.Module, state: dict, what: str, assign: bool = False):
    """load_state_dict that names the first offending keys instead of a wall of text."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    kind = [f"{k} ({str(state[k].dtype).replace('torch.', '')}, not floating point)" for k, v in expected.items()
            if k in state and v.is_floating_point() and not (torch.is_tensor(state[k]) and state[k].is_floating_point())]
    for problems, label in [(missing, "missing key"), (unexpected, "unexpected key"), (wrong, "wrong shape for"),
                            (kind, "wrong number type for")]:
        if problems:
            raise LoadError(f"{what}: {name_first(label, problems)}")
    module.load_state_dict(state, strict=True, assign=assign)


# ---- LM: transformers keys <-> ours -------------------------------------------------------------
def hf_lm_key_table(cfg: LMConfig) -> list[tuple[str, list[str]]]:
    """(our key, [transformers keys concatenated along dim 0 to make it])."""
    d = "decoder.model.decoder."
    table = [("text_proj.weight", ["enc_to_dec_proj.weight"]), ("text_proj.bias", ["enc_to_dec_proj.bias"])]
    table += [(f"embed.{k}.weight", [f"{d}embed_tokens.{k}.weight"]) for k in range(cfg.n_codebooks)]
    for i in range(cfg.n_layers):
        o, h = f"layers.{i}.", f"{d}layers.{i}."
        table += [
            (o + "self_attn.qkv.weight", [h + f"self_attn.{p}_proj.weight" for p in "qkv"]),
            (o + "self_attn.out.weight", [h + "self_attn.out_proj.weight"]),
            (o + "cross_attn.q.weight", [h + "encoder_attn.q_proj.weight"]),
            (o + "cross_attn.kv.weight", [h + "encoder_attn.k_proj.weight", h + "encoder_attn.v_proj.weight"]),
            (o + "cross_attn.out.weight", [h + "encoder_attn.out_proj.weight"]),
            (o + "ffn_in.weight", [h + "fc1.weight"]),
            (o + "ffn_out.weight", [h + "fc2.weight"]),
        ]
        for ours, theirs in [("norm_self", "self_attn_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"), ("norm_ffn", "final_layer_norm")]:
            table += [(f"{o}{ours}.{p}", [f"{h}{theirs}.{p}"]) for p in ("weight", "bias")]
    table += [(f"norm_out.{p}", [f"{d}layer_norm.{p}"]) for p in ("weight", "bias")]
    table += [(f"heads.{k}.weight", [f"decoder.lm_heads.{k}.weight"]) for k in range(cfg.n_codebooks)]
    return table


def gather(state: dict, table, what: str) -> dict:
    """Apply a key table [(our key, [their keys, concatenated along dim 0])]; the keys used are
    popped from `state`, so that what is left over is unexpected."""
    ours = {}
    for key, sources in table:
        missing = [s for s in sources if s not in state]
        if missing:
            raise LoadError(f"{what}: missing key {missing[0]}")
        parts = [state.pop(s) for s in sources]
        ours[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return ours


def lm_state_from_hf(state: dict, cfg: LMConfig) -> dict:
    """Pick the decoder + projection keys out of a full transformers MusicGen state dict."""
    lm_part = {k: v for k, v in state.items() if k.startswith(("decoder.", "enc_to_dec_proj."))}
    # files saved by older transformers store the fixed sinusoid table as a parameter: recomputed here
    lm_part.pop("decoder.model.decoder.embed_positions.weights", None)
    ours = gather(lm_part, hf_lm_key_table(cfg), "LM weights")
    if lm_part:
        raise LoadError(f"LM weights: {name_first('unexpected key', list(lm_part))}")
    return ours


def lm_state_to_hf(state: dict, cfg: LMConfig) -> dict:
    """Our LM keys -> transformers keys (splitting the fused projections)."""
    out = {}
    for key, targets in hf_lm_key_table(cfg):
        for target, part in zip(targets, state[key].chunk(len(targets))):
            out[target] = part.contiguous()
    return out


# ---- size limits, checked before anything is built ------------------------------------------------
# Far above any MusicGen (large: dim 2048, 48 layers, 3.3B parameters), far below what would hang or
# exhaust memory while building the model (a config file can hold anything: n_layers=1e9).
LM_LIMITS = {"dim": 16384, "n_layers": 256, "n_heads": 256, "n_codebooks": 64, "card": 1 << 20, "n_special": 16,
             "text_dim": 16384, "ffn_dim": 131072}
MAX_LM_PARAMETERS = 20e9


def lm_parameters(cfg: LMConfig) -> float:
    """About how many parameters an LM of this config has (self + cross attention, FFN, tables, heads)."""
    d = cfg.dim
    per_layer = 4 * d * d + 4 * d * d + 2 * d * cfg.ffn_dim
    return cfg.n_layers * per_layer + cfg.n_codebooks * (2 * cfg.card + cfg.n_special) * d + cfg.text_dim * d


def lm_config(values: dict, where: str = "config.json") -> LMConfig:
    """LMConfig from a config file's values, each checked first (a file can hold anything: say which
    setting is wrong, in one line), then its size (check_lm_size)."""
    for f in fields(LMConfig):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.type in (bool, "bool"):
            ok = isinstance(value, bool)
        elif f.type in (float, "float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if f.name == "ffn_dim" else 1)
        if not ok:
            raise LoadError(f"{where}: LM setting {f.name}={value!r} describes no valid model")
    try:
        return check_lm_size(LMConfig(**values), where)
    except (TypeError, ValueError) as e:  # an unknown setting, or dim not divisible by n_heads
        raise LoadError(f"{where}: the LM settings do not fit this version: {e}") from None


def check_lm_size(cfg: LMConfig, where: str = "config.json") -> LMConfig:
    """LoadError (one line) for an LM too big to be a MusicGen, before anything is built."""
    for name, limit in LM_LIMITS.items():
        if getattr(cfg, name) > limit:
            raise LoadError(f"{where}: LM setting {name}={getattr(cfg, name)!r} is above the limit of {limit} "
                            "(no MusicGen is that large; is the file damaged?)")
    if lm_parameters(cfg) > MAX_LM_PARAMETERS:
        raise LoadError(f"{where}: the LM it describes has about {lm_parameters(cfg) / 1e9:.0f}B parameters, above the "
                        f"limit of {MAX_LM_PARAMETERS / 1e9:.0f}B (MusicGen large has 3.3B)")
    return cfg


def check_sizes(values: dict, limits: dict, where: str):
    """Each named size a whole number in [1, its limit]: for the T5 and EnCodec sections."""
    for name, limit in limits.items():
        value = values.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            more = f" (at most {limit})" if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit else ""
            raise LoadError(f"{where}: {name}={value!r} describes no valid model{more}")


def lm_config_from_hf(config: dict, state: dict | None = None) -> LMConfig:
    dec = config.get("decoder")
    if not isinstance(dec, dict) or "hidden_size" not in dec:
        raise LoadError("config.json has no MusicGen 'decoder' section; is this a transformers MusicGen folder?")
    if dec.get("audio_channels", 1) != 1:
        raise LoadError("stereo MusicGen checkpoints are not supported (audio_channels != 1)")
    if dec.get("activation_function", "gelu") != "gelu" or dec.get("scale_embedding", False):
        raise LoadError("config.json describes a decoder variant this model does not implement")
    # a STAGE checkpoint stores one more input row per codebook (the context token)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_codebooks", "vocab_size", "ffn_dim")
    missing = [k for k in keys if k not in dec]
    if missing:
        raise LoadError(f"config.json's 'decoder' section: missing '{missing[0]}'")
    text = config.get("text_encoder", {})
    rows = state["decoder.model.decoder.embed_tokens.0.weight"].shape[0] if state and "decoder.model.decoder.embed_tokens.0.weight" in state else None
    card = dec["vocab_size"]
    special = max(1, rows - card) if rows is not None and isinstance(card, int) else 1
    return lm_config(dict(dim=dec["hidden_size"], n_layers=dec["num_hidden_layers"], n_heads=dec["num_attention_heads"],
                          n_codebooks=dec["num_codebooks"], card=card, ffn_dim=dec["ffn_dim"], n_special=special,
                          text_dim=text.get("d_model", 768) if isinstance(text, dict) else 768), "config.json's 'decoder' section")


def add_context_token(lm_state: dict, cfg: LMConfig) -> tuple[dict, LMConfig]:
    """Turn a plain MusicGen LM state into a STAGE one: append the context token's row (id card+1)
    to each codebook's embedding table. The row starts as the mean of that table's code rows: a
    vector of typical norm and direction, so the pretrained layers see an in-distribution input
    on the first fine-tuning step, rather than a random vector that could be far from every code."""
    if cfg.n_special >= 2:
        return lm_state, cfg
    state = dict(lm_state)
    for k in range(cfg.n_codebooks):
        table = state[f"embed.{k}.weight"]
        state[f"embed.{k}.weight"] = torch.cat([table, table[: cfg.card].mean(0, keepdim=True)])
    return state, replace(cfg, n_special=2)


def submodule_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def renamed_weight_norm(state: dict, expected: dict) -> dict:
    """Old files store weight norm as weight_g/weight_v; new modules as parametrizations.weight.original0/1."""
    if not any(".parametrizations.weight." in k for k in expected):
        return state
    out = {}
    for k, v in state.items():
        k = k.replace(".weight_g", ".parametrizations.weight.original0").replace(".weight_v", ".parametrizations.weight.original1")
        out[k] = v
    return out


# ---- our native layout --------------------------------------------------------------------------
# A folder with config.json {"format": "stage_min", "lm": {LMConfig fields}, "base": ...} and
# model.safetensors holding our LM keys under "lm.". The T5 encoder, EnCodec and spiece.model come
# from "base", a transformers-layout folder or hub id, unless the folder holds them itself
# ("text_encoder.*" / "audio_encoder.*" keys plus spiece.model and their configs in config.json).
NATIVE_FORMAT = "stage_min"


def is_native(config: dict) -> bool:
    return config.get("format") == NATIVE_FORMAT


def lm_config_from_native(config: dict) -> LMConfig:
    values = config.get("lm")
    if not isinstance(values, dict):
        raise LoadError("native config.json has no 'lm' section")
    return lm_config(values, "native config.json's 'lm' section")


MAX_ABS_WEIGHT = 1e4  # no trained MusicGen weight comes near; a diverging run's do (1e30 at --lr 1e30)


def check_finite(module: torch.nn.Module, what: str):
    """Refuse weights holding NaN or infinity, or values beyond +-MAX_ABS_WEIGHT (a diverged training
    run): they only make noise."""
    for name, p in module.named_parameters():
        p = p.detach()
        if not p.is_floating_point() or not p.numel():
            continue
        if not bool(torch.isfinite(p).all()):
            raise LoadError(f"{what}: weight {name} holds NaN or infinite values (a diverged training run?)")
        if float(p.abs().max()) > MAX_ABS_WEIGHT:
            raise LoadError(f"{what}: weight {name} reaches |w| = {float(p.abs().max()):.3g}, above {MAX_ABS_WEIGHT:g} "
                            "(a diverged training run?)")


def with_default_mode(path: Path):
    """Give a file (or folder) made under a temporary name the permissions a plain open() would
    have given it: temporary files are created private (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def write_atomic(path: Path, write):
    """write(tmp_path) then rename onto path, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique: runs may share a folder
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with_default_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_native(folder, lm_state: dict, cfg: LMConfig, base: str | None, extra: dict | None = None,
                more_weights: dict | None = None, more_config: dict | None = None):
    """Write an LM (and optionally T5/EnCodec weights) in our layout. `extra` goes into config.json
    (training step, etc.). Each file is written to a temporary name and renamed."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"lm.{k}": v.detach().contiguous().cpu() for k, v in lm_state.items()}
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (more_weights or {}).items()})
    config = {"format": NATIVE_FORMAT, "lm": asdict(cfg), "base": base, **(more_config or {}), **(extra or {})}
    write_atomic(folder / "model.safetensors", lambda p: save_file(tensors, str(p)))
    write_atomic(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
