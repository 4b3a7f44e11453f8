"""Reading the original STAGE's training checkpoints (Lightning `.ckpt`) without running their code.

The original's Lightning trainer writes `last.ckpt`, one `.ckpt` per epoch and `interrupted.ckpt`
(docs/original.md#checkpoints). Besides the weights (`state_dict`: `encodec_model.*`, `lm.*`,
`condition_provider.*`) each holds `hyper_parameters = {"params": MusicgenParams(...)}`: pickled
dataclass instances of the original's own modules, with `Path`s, `frozendict`s, enums and class
references inside. `torch.load(weights_only=True)` refuses such a file; an ordinary unpickler would
import the original's package and call whatever the file names.

`read_lightning_ckpt` reads it with a restricted unpickler (`torch.load` with this module's
`Unpickler`): every global the pickle asks for goes through `RestrictedUnpickler.find_class`, which
- returns an object of the allow-list below (tensor rebuilding, plain containers, pure paths, dtypes);
- makes a fresh, inert record type for a name of the original's package (`stage.*`) or of a module
  that is not installed here (`frozendict` is read as a plain dict): creating, calling or filling
  such a record only stores its arguments and fields, nothing of the named class is imported or run;
- refuses anything else (`os.system`, `builtins.eval`, `subprocess.Popen`, any other standard
  library or installed module) with `UnsafePickle`, before any of it is called.
"""
import _compat_pickle
import importlib.util
import pathlib
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from .loading import LoadError

# the original's package: its names always become records, even where it happens to be installed
ORIGINAL_PACKAGES = {"stage"}
# the original's stem enum (giorgioskij/stage: src/stage/data/stem.py), for display only
STEM_NAMES = {0: "drums", 1: "bass", 2: "guitar", 3: "other_keys", 4: "piano", 5: "bowed_strings", 6: "other", 7: "vocals", 8: "any"}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


class FrozenDict(dict):
    """What a pickled `frozendict` becomes: a dict (hashable, as the original's dataclasses need)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items(), key=repr)))


class Record:
    """An inert stand-in for an object of a class that is not loaded. `origin` is the name the pickle
    gave ("stage.hyperparameters.LmParams"); `args` what it was called or created with (an enum
    member's value), `fields` what it was filled with (a dataclass's fields). Fields read as attributes."""
    origin = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "fields", {})
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ values)
        if isinstance(state, dict):
            self.fields.update({str(k): v for k, v in state.items()})
        else:
            self.fields["__state__"] = state

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"{self.origin} record has no field {name!r}") from None

    # enum members are dict keys in the original's hyper-parameters: equal when the same call
    def __hash__(self):
        try:
            return hash((self.origin, self.args))
        except TypeError:
            return id(self)

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        if not self.args and not other.args:
            return self is other
        return self.origin == other.origin and self.args == other.args and self.fields == other.fields

    def __repr__(self):
        if self.args and not self.fields:
            return f"{self.origin}({', '.join(map(repr, self.args))})"
        return f"{self.origin}({', '.join(f'{k}={v!r}' for k, v in self.fields.items())})"


_record_types: dict = {}


def record_type(module: str, name: str) -> type:
    """One inert type per (module, name): also what a class reference in the pickle reads as."""
    key = f"{module}.{name}"
    if key not in _record_types:
        _record_types[key] = type(name if name.isidentifier() else "Record", (Record,), {"origin": key, "__module__": __name__ + ".records"})
    return _record_types[key]


def is_record_type(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, Record) and obj is not Record


def _allowed() -> dict:
    from torch import _utils

    allowed = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.list": list, "builtins.dict": dict,
        "builtins.tuple": tuple, "builtins.slice": slice, "builtins.complex": complex, "builtins.bytearray": bytearray,
        "builtins.int": int, "builtins.float": float, "builtins.bool": bool, "builtins.str": str, "builtins.bytes": bytes,
        "torch._utils._rebuild_tensor_v2": _utils._rebuild_tensor_v2,
        "torch._utils._rebuild_tensor": _utils._rebuild_tensor,
        "torch._utils._rebuild_parameter": _utils._rebuild_parameter,
        "torch.Size": torch.Size, "torch.device": torch.device,
        # paths: pure ones (no filesystem access, the original's paths are not this machine's anyway)
        **{f"{m}.{n}": pathlib.PureWindowsPath if "Windows" in n else pathlib.PurePosixPath
           for m in ("pathlib", "pathlib._local") for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
        # frozendict (C or Python implementation) pickles as frozendict(dict)
        **{f"{m}.frozendict": FrozenDict for m in ("frozendict", "frozendict.core", "frozendict._frozendict", "frozendict.cool")},
        # hyper-parameters saved as Lightning's AttributeDict (a dict)
        "lightning.fabric.utilities.data.AttributeDict": dict, "lightning_fabric.utilities.data.AttributeDict": dict,
        "pytorch_lightning.utilities.parsing.AttributeDict": dict, "lightning.pytorch.utilities.parsing.AttributeDict": dict,
    }
    for name in ("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64"):
        allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


_ALLOWED: dict | None = None


def _installed(root: str) -> bool:
    if root in sys.stdlib_module_names or root in sys.builtin_module_names:
        return True
    try:  # a top-level name: searches the path, imports nothing
        return importlib.util.find_spec(root) is not None
    except (ImportError, ValueError):
        return True  # when in doubt, not a record: refused


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals come only from the allow-list or are inert records."""

    def find_class(self, module, name):
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnsafePickle(f"{module!r}.{name!r} is not on the allow-list")
        # protocol 2 (torch.save's) names Python 2 modules: __builtin__.eval is builtins.eval
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in _ALLOWED:
            return _ALLOWED[key]
        root = str(module).split(".")[0]
        if root in ORIGINAL_PACKAGES or not _installed(root):
            return record_type(module, name)
        raise UnsafePickle(f"{key} is not on the allow-list")


def load(file, **kwargs):  # what torch's legacy format asks of a pickle module
    return RestrictedUnpickler(file, **kwargs).load()


class _PickleModule:  # the `pickle_module` handed to torch.load
    Unpickler = RestrictedUnpickler
    load = staticmethod(load)
    __name__ = __name__


def restricted_torch_load(path: Path, mmap: bool = False):
    """torch.load through the restricted unpickler: tensors as torch stores them, every other global
    allow-listed or inert. Raises LoadError (one line) for a refused or unreadable file."""
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        # weights_only=False hands unpickling to pickle_module: every global goes through
        # RestrictedUnpickler.find_class (torch's wrapper only maps storage names), never a plain unpickler.
        # weights_only=True cannot turn the original's classes into records; tests/test_original_ckpt.py
        # plants 21 payloads and checks that none runs.
        if mmap and zipped:
            return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_PickleModule, mmap=True)
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except UnsafePickle as e:
        raise LoadError(f"{path}: refused: the pickle asks for {str(e).split(' is not')[0]}, which is not on the allow-list "
                        "(nothing was run)") from None
    except Exception as e:
        text = str(e)
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {text.splitlines()[0] if text else ''}") from None


def is_lightning_ckpt(pkg) -> bool:
    return isinstance(pkg, dict) and isinstance(pkg.get("state_dict"), dict) and (
        "hyper_parameters" in pkg or "pytorch-lightning_version" in pkg or "optimizer_states" in pkg)


def read_lightning_ckpt(path: Path) -> dict:
    """The whole checkpoint as plain data: "state_dict" (tensors), "hyper_parameters" (records,
    dicts, paths), and Lightning's own entries (epoch, global_step, ...). LoadError if refused."""
    pkg = restricted_torch_load(path, mmap=True)
    if not is_lightning_ckpt(pkg):
        raise LoadError(f"{path} is not a Lightning checkpoint (no 'state_dict' with hyper-parameters or optimizer states)")
    return pkg


# ---- showing what it holds -----------------------------------------------------------------------
def plain(obj, depth: int = 0):
    """Records, paths and enums as JSON-like data: {"class": origin, field: value, ...}."""
    if depth > 20:
        return "..."
    if isinstance(obj, Record):
        if obj.args and not obj.fields:  # an enum member (or a call): its class and value
            value = obj.args[0] if len(obj.args) == 1 else list(obj.args)
            if obj.origin.endswith(".Stem") and value in STEM_NAMES:
                return f"Stem.{STEM_NAMES[value].upper()} ({STEM_NAMES[value]})"
            return f"{obj.origin.rsplit('.', 1)[-1]}({value!r})"
        return {"class": obj.origin, **{k: plain(v, depth + 1) for k, v in obj.fields.items()}}
    if is_record_type(obj):
        return f"<class {obj.origin}>"
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {str(plain(k, depth + 1)): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain(v, depth + 1) for v in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else f"tensor{tuple(obj.shape)}"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _field(obj, *names):
    for n in names:
        obj = obj.fields.get(n) if isinstance(obj, Record) else obj.get(n) if isinstance(obj, dict) else None
    return obj


def summary(pkg: dict) -> dict:
    """What a researcher wants to know of an original training checkpoint, as plain data."""
    hp = pkg.get("hyper_parameters") or {}
    params = hp.get("params") if isinstance(hp, dict) else None
    out = {"lightning_version": pkg.get("pytorch-lightning_version"), "epoch": pkg.get("epoch"), "global_step": pkg.get("global_step")}
    lm = _field(params, "lm_params")
    if lm is not None:
        out["lm"] = {k: plain(_field(lm, k)) for k in ("dim", "n_layers", "n_heads", "card", "padding_token", "sep_token", "cross_attend", "weights")}
        out["lm"]["class"] = plain(lm)["class"] if isinstance(lm, Record) else None
    pp = _field(params, "prompt_processor_params")
    if pp is not None:
        out["prompt_processor"] = {k: plain(_field(pp, k)) for k in ("model_class", "keep_only_valid_steps", "context_dropout")}
    cond = _field(params, "conditioning_params")
    if cond is not None:
        out["conditioning"] = {k: plain(_field(cond, k)) for k in ("embedder_types", "conditioning_methods", "conditioning_dropout")}
    enc = _field(params, "encodec_params")
    if enc is not None:
        out["encodec"] = {k: plain(_field(enc, k)) for k in ("sample_rate", "weights")}
    lora = _field(params, "lora_params")
    out["lora"] = plain(lora)
    # the target stem is a data-module setting: Lightning stores it only when the data module saved
    # its hyper-parameters (the original's StemmedDatamodule does not)
    data = pkg.get("datamodule_hyper_parameters")
    data_params = data.get("params") if isinstance(data, dict) else None
    out["target_stem"] = plain(_field(data_params, "target_stem")) if data_params is not None else None
    if params is None and hp:
        out["hyper_parameters"] = plain(hp)
    return out
