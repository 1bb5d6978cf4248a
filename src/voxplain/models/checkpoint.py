"""Save our checkpoints and load models safely.

A checkpoint is a folder::

    config.json    how to rebuild the model (zoo name + options) and what it expects:
                   task, class / channel / region names, input size, preprocessing
    model.pt       the weights (a state_dict, loadable with ``weights_only=True``)
    history.json   per-epoch training history (when given)

``load_model`` takes what a user typed: such a folder (or its config.json), the name
of a checkpoint shipped with voxplain (``demo-unet``, ``demo-grade``, ``demo-slices``;
a local path of the same name wins), a ``module:factory`` (or ``file.py:factory``)
plus a weights file, or a TorchScript file. ``module:factory`` imports and runs
Python code, and a TorchScript file carries code of its own (so do MONAI bundles):
load those only from sources you trust. A file that holds a whole pickled
``nn.Module`` is only unpickled with ``allow_unsafe_pickle=True``, because unpickling
runs whatever code the file names. A path read from a file or a database (e.g. a
sweep's best trial) is loaded with :func:`load_checkpoint_folder`, which only ever
reads a checkpoint folder and never imports anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from importlib import resources
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_dir
from .zoo import build_model

__all__ = ["save_checkpoint", "load_model", "load_checkpoint", "load_checkpoint_folder", "read_checkpoint_config",
           "is_checkpoint_path", "resolve_model_spec", "shipped_checkpoint", "UnsafeModelFileError",
           "CONFIG_NAME", "WEIGHTS_NAME", "HISTORY_NAME", "SHIPPED_MODELS"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
HISTORY_NAME = "history.json"
FORMAT = "voxplain-checkpoint"
_FACTORY = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][\w.]*)$")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "weights")
#: checkpoints shipped in ``voxplain/assets/models``, usable by name as a model spec
SHIPPED_MODELS = ("demo-grade", "demo-unet", "demo-slices")


class UnsafeModelFileError(ValueError):
    """The file holds a pickled model object, which is only loaded on explicit request."""


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def save_checkpoint(model: nn.Module, config: Mapping | None, out: str | os.PathLike,
                    history: list[dict] | None = None) -> Path:
    """Write ``model`` as a checkpoint folder ``out`` (atomically) and return its path.

    ``config`` holds the metadata to keep (``task``, ``class_names``, ``channel_names``,
    ``region_names``, ``input_size``, ``preprocessing`` ...). ``model`` and
    ``model_config`` (how to rebuild it) are taken from ``config`` or, for zoo models,
    from ``model.voxplain_config``.
    """
    meta = dict(config or {})
    built = getattr(model, "voxplain_config", None) or {}
    meta.setdefault("model", built.get("model"))
    meta.setdefault("model_config", built.get("model_config", {}))
    if not meta["model"]:
        raise ValueError("save_checkpoint needs the zoo model name: build the model with build_model() "
                         "or pass config={'model': NAME, 'model_config': {...}}")
    meta = {"format": FORMAT, "version": 1, **_jsonable(meta), "weights": WEIGHTS_NAME}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(out, kind="checkpoint") as tmp:
        torch.save(state, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if history is not None:
            (tmp / HISTORY_NAME).write_text(json.dumps(_jsonable(history), indent=2) + "\n")
    return Path(out)


def _config_path(path: Path) -> Path:
    return path / CONFIG_NAME if path.is_dir() else path


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a checkpoint: an existing folder or ``.json`` file (its config).

    This only says how a user-typed model spec is read; whether the folder really
    holds a checkpoint is checked when it is loaded (:func:`read_checkpoint_config`).
    """
    path = Path(path)
    return path.exists() and (path.is_dir() or path.suffix == ".json")


def shipped_checkpoint(name: str) -> Path:
    """Folder of a checkpoint shipped with voxplain (one of :data:`SHIPPED_MODELS`)."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"{name!r} is not a shipped model; shipped: {', '.join(SHIPPED_MODELS)}")
    path = Path(str(resources.files("voxplain").joinpath("assets", "models", name)))
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"the shipped model {name} is missing at {path}; reinstall voxplain")
    return path


def resolve_model_spec(spec: str | os.PathLike) -> str | Path:
    """``spec`` as typed, or the shipped checkpoint's folder for a shipped model's name with no local path of
    that name (a local folder ``demo-unet`` wins over the shipped ``demo-unet``)."""
    if isinstance(spec, str) and spec in SHIPPED_MODELS and not Path(spec).exists():
        return shipped_checkpoint(spec)
    return spec


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of checkpoint folder ``path`` (or of the JSON file itself)."""
    cfg_path = _config_path(Path(path))
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no {CONFIG_NAME} here; not a voxplain checkpoint folder")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{cfg_path}: expected a voxplain checkpoint config with a 'model' entry")
    return meta


def _weights_in(cfg_path: Path, meta: dict) -> Path:
    """The weights file a checkpoint config names: a file inside the checkpoint folder, nowhere else."""
    name = meta.get("weights", WEIGHTS_NAME)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"{cfg_path}: 'weights' must name a file inside the checkpoint folder (e.g. "
                         f"{WEIGHTS_NAME!r}), got {name!r}; refusing to read a file outside it")
    return cfg_path.parent / name


def load_checkpoint(path: str | os.PathLike, weights: str | os.PathLike | None = None,
                    device=None) -> tuple[nn.Module, dict]:
    """Rebuild the model of checkpoint ``path`` and load its weights; returns ``(model, config)``."""
    cfg_path = _config_path(Path(path))
    meta = read_checkpoint_config(cfg_path)
    weights_path = Path(weights) if weights is not None else _weights_in(cfg_path, meta)
    try:
        model = build_model(meta["model"], **meta.get("model_config", {}))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{cfg_path}: cannot rebuild model {meta['model']!r}: {err}") from None
    _load_weights_into(model, weights_path, device)
    if device is not None:
        model.to(device)
    return model.eval(), meta


def load_checkpoint_folder(path: str | os.PathLike, device=None) -> tuple[nn.Module, dict]:
    """Load the checkpoint folder ``path`` and nothing else: for paths read from files or databases.

    Unlike :func:`load_model`, a path that is not a checkpoint folder is an error,
    never a ``module:factory`` to import or a model file to unpickle.
    """
    path = Path(path)
    if not (path.is_dir() and (path / CONFIG_NAME).is_file()):
        raise FileNotFoundError(f"{str(path)!r} is not a voxplain checkpoint folder (a folder with {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME}) on this machine")
    return load_checkpoint(path, device=device)


def _torch_load_weights(path: Path, device=None):
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return torch.load(path, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise ValueError(f"{path}: not a readable PyTorch weights file (corrupt or another format)") from None
        raise UnsafeModelFileError(
            f"{path}: holds Python objects other than tensors (e.g. {found[1]}), so it cannot be read "
            "with weights_only=True"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({' '.join(str(err).split())[:200]})") from None


def _as_state_dict(obj, path: Path) -> dict:
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            # weights saved from nn.DataParallel / DistributedDataParallel carry a "module." prefix
            if all(k.startswith("module.") for k in obj):
                obj = {k[len("module."):]: v for k, v in obj.items()}
            return dict(obj)
    raise ValueError(f"{path}: expected a state_dict (a mapping of parameter names to tensors), "
                     f"got {type(obj).__name__}")


def _load_weights_into(model: nn.Module, path: Path, device=None) -> None:
    state = _as_state_dict(_torch_load_weights(path, device), path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the model: {' '.join(str(err).split())[:500]}") from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _import_factory(spec: str):
    match = _FACTORY.match(spec)
    if match is None:
        return None
    module_name, attr = match["module"], match["attr"]
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise FileNotFoundError(f"model file {file} not found (from {spec!r})")
        mod_spec = importlib.util.spec_from_file_location(f"_voxplain_user_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"cannot import module {module_name!r} for model {spec!r}: {err}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable; expected a function or class that returns an nn.Module")
    return obj


def load_model(spec: str | os.PathLike, weights: str | os.PathLike | None = None,
               allow_unsafe_pickle: bool = False, device=None, random_weights: bool = False) -> nn.Module:
    """Load a model from ``spec``, safely by default; returns it in eval mode.

    ``spec`` may be

    * a voxplain checkpoint folder or its ``config.json`` (``weights`` overrides its weights file);
    * a shipped checkpoint's name (:data:`SHIPPED_MODELS`), unless a local path has that name;
    * ``"package.module:factory"`` or ``"path/to/file.py:factory"``: the module is imported (its code
      runs), the factory is called without arguments and ``weights`` (a state_dict file) is loaded
      with ``weights_only=True``; without ``weights`` it is an error (a factory gives a randomly
      initialised network) unless ``random_weights=True``;
    * a TorchScript file (``torch.jit.save``; it carries code that runs: trusted files only);
    * a file holding a whole pickled ``nn.Module``: refused unless ``allow_unsafe_pickle=True``.

    ``spec`` is what a user typed: never pass a string read from a file or database here
    (use :func:`load_checkpoint_folder`). ``device`` (optional) is where tensors are loaded
    and the model is moved.
    """
    spec = resolve_model_spec(spec)
    path = Path(spec)
    if path.exists():
        if is_checkpoint_path(path):
            return load_checkpoint(path, weights, device)[0]
        if weights is not None:
            raise ValueError(f"a weights file is only used with a checkpoint or 'module:factory', "
                             f"but the model is the file {path}")
        return _load_model_file(path, allow_unsafe_pickle, device)
    factory = _import_factory(str(spec))
    if factory is None:
        raise FileNotFoundError(f"model {str(spec)!r} not found: expected a checkpoint folder, a shipped model "
                                f"({', '.join(SHIPPED_MODELS)}), a model file or 'module:factory'")
    if weights is None and not random_weights:
        raise ValueError(f"{spec} builds a network with random weights: give its trained weights with --weights "
                         "FILE (weights=...), or --random-weights (random_weights=True) to explain the untrained "
                         "network on purpose")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    if weights is not None:
        _load_weights_into(model, Path(weights), device)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_model_file(path: Path, allow_unsafe_pickle: bool, device=None) -> nn.Module:
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=device or "cpu").eval()
        except RuntimeError as err:
            raise ValueError(f"{path}: unreadable TorchScript file ({' '.join(str(err).split())[:200]})") from None
    try:
        obj = _torch_load_weights(path, device)
    except UnsafeModelFileError:
        if not allow_unsafe_pickle:
            raise UnsafeModelFileError(
                f"{path} holds a pickled Python object (probably a whole model saved with torch.save(model)). "
                "Unpickling can run arbitrary code hidden in the file, so it is refused by default. "
                "If you trust the file's source, pass allow_unsafe_pickle=True (--allow-unsafe-pickle on the "
                "command line). Safer: save model.state_dict() and load it as 'module:factory' with that file "
                "as --weights (read with weights_only=True), or, for voxplain's zoo models, a checkpoint folder "
                "(voxplain.models.save_checkpoint)"
            ) from None
        try:
            obj = torch.load(path, map_location=device or "cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise ValueError(f"{path}: cannot unpickle the model ({type(err).__name__}: {err})") from None
    if isinstance(obj, nn.Module):
        return (obj.to(device) if device is not None else obj).eval()
    if isinstance(obj, Mapping):
        raise ValueError(f"{path} holds only weights (a state_dict), not a model; give the architecture as "
                         "'module:factory' (or a voxplain checkpoint folder) with this file as the weights")
    raise ValueError(f"{path}: expected a model, got {type(obj).__name__}")
