"""Model sources: one spec string for files, timm, torchvision and the built-ins.

``path/to/model.py`` (a ``build_model()`` function, a ``model`` object, or the only
``nn.Module`` subclass defined in the file), ``path/to/model.py:name``, ``timm:NAME``,
``torchvision:NAME``, ``allconv``, ``mlp``. Extra sources register a prefix with
:func:`register_source`.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelSourceError, SurgeonError
from .builtin import BUILTINS

SourceFn = Callable[[str, dict[str, Any]], nn.Module]
SOURCES: dict[str, SourceFn] = {}


def register_source(prefix: str) -> Callable[[SourceFn], SourceFn]:
    """Register a builder for specs ``PREFIX:NAME``."""

    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[prefix] = fn
        return fn

    return deco


def parse_model_args(items: Iterable[str]) -> dict[str, Any]:
    """``["num_classes=10", "drop_rate=0.1"]`` -> ``{"num_classes": 10, "drop_rate": 0.1}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelSourceError(
                f"bad --model-arg {item!r}", hint="write key=value, e.g. num_classes=10"
            )
        try:
            value: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
        out[key.strip()] = value
    return out


def _suggest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else ""


@register_source("timm")
def _timm(name: str, args: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        hint = _suggest(name, timm.list_models()) or "list names with timm.list_models()"
        raise ModelSourceError(f"unknown timm model {name!r}", hint=hint)
    args = {"pretrained": False, **args}
    try:
        return timm.create_model(name, **args)
    except TypeError as exc:
        raise ModelSourceError(f"timm:{name}: {exc}", hint="check the --model-arg names") from exc


@register_source("torchvision")
def _torchvision(name: str, args: dict[str, Any]) -> nn.Module:
    from torchvision import models

    names = models.list_models()
    if name not in names:
        hint = _suggest(name, names) or "list names with torchvision.models.list_models()"
        raise ModelSourceError(f"unknown torchvision model {name!r}", hint=hint)
    args = {"weights": None, **args}
    try:
        return models.get_model(name, **args)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(
            f"torchvision:{name}: {exc}", hint="check the --model-arg names"
        ) from exc


def _load_file(path: Path):
    source = path.read_text()
    try:
        ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ModelSourceError(
            f"syntax error in {path}:{exc.lineno}: {exc.msg}", hint="fix the model file"
        ) from exc
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"surgeon_user_model_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        line = next(
            (
                f.lineno
                for f in reversed(traceback.extract_tb(exc.__traceback__))
                if f.filename == str(path)
            ),
            "?",
        )
        raise ModelSourceError(
            f"error while importing {path}:{line}: {type(exc).__name__}: {exc}",
            hint="the model file must import cleanly",
        ) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _user_line(exc: BaseException, path: Path) -> str:
    """``file:line`` of the innermost traceback frame in the model file, else the innermost
    frame of all (a library the file called)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
    f = mine[-1] if mine else (frames[-1] if frames else None)
    return f"{f.filename}:{f.lineno}" if f else str(path)


def _used_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _root_class(module, path: Path) -> type:
    """The file's model class: its only ``nn.Module`` class, or the one no other class of the
    file uses (a ``Net`` built from the ``Block`` beside it)."""
    classes = {
        c.__name__: c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, nn.Module) and c.__module__ == module.__name__
    }
    if len(classes) == 1:
        return next(iter(classes.values()))
    if not classes:
        raise ModelSourceError(
            f"no model found in {path} (no nn.Module class)",
            hint="define build_model(), a `model` object or an nn.Module class",
        )
    tree = ast.parse(path.read_text(), filename=str(path))
    bodies = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    used = set()
    for name, node in bodies.items():
        if name in classes:
            used |= _used_names(node) - {name}
    roots = sorted(n for n in classes if n not in used)
    if len(roots) == 1:
        return classes[roots[0]]
    candidates = ", ".join(f"{path}:{n}" for n in (roots or sorted(classes)))
    raise ModelSourceError(
        f"{path} defines {len(roots or classes)} nn.Module classes that no other class uses",
        hint=f"pick one: {candidates} (or define build_model())",
    )


def _from_file(spec: str, args: dict[str, Any]) -> nn.Module:
    file_part, _, attr = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(file_part)
    if not path.is_file():
        raise ModelSourceError(
            f"model file not found: {file_part}",
            hint="give a path to a .py file, timm:NAME, torchvision:NAME, allconv or mlp",
        )
    module = _load_file(path)
    if attr:
        if not hasattr(module, attr):
            raise ModelSourceError(
                f"{path} has no attribute {attr!r}", hint="check the name after ':'"
            )
        obj = getattr(module, attr)
    elif callable(getattr(module, "build_model", None)):
        obj = module.build_model
    elif isinstance(getattr(module, "model", None), nn.Module):
        obj = module.model
    else:
        obj = _root_class(module, path)
    if isinstance(obj, nn.Module):
        if args:
            raise ModelSourceError(
                f"{spec} is a model object; --model-arg does not apply", hint="drop --model-arg"
            )
        return obj
    if not callable(obj):
        raise ModelSourceError(
            f"{spec} is not a model, a class or a factory", hint="point at an nn.Module"
        )
    try:
        model = obj(**args)
    except SurgeonError:
        raise
    except Exception as exc:  # the user's own code failed: say where, in one line
        where = _user_line(exc, path)
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        hint = "check the --model-arg names" if isinstance(exc, TypeError) else "fix the model file"
        raise ModelSourceError(
            f"building {spec} failed at {where}: {type(exc).__name__}: {text}", hint=hint
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"{spec} returned {type(model).__name__}, not an nn.Module", hint="return the model"
        )
    return model


def build_model(spec: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec``; the spec is recorded on the model for saving."""
    args = dict(model_args or {})
    prefix, sep, name = spec.partition(":")
    if spec in BUILTINS:
        try:
            model = BUILTINS[spec](**args)
        except TypeError as exc:
            raise ModelSourceError(
                f"cannot build {spec}: {exc}", hint="check the --model-arg names"
            ) from exc
    elif sep and prefix in SOURCES:
        model = SOURCES[prefix](name, args)
    elif spec.endswith(".py") or ".py:" in spec or Path(spec).exists():
        model = _from_file(spec, args)
    else:
        raise ModelSourceError(f"unknown model {spec!r}", hint=_unknown_spec_hint(spec))
    model.surgeon_source = {"spec": spec, "args": args}
    return model


def _unknown_spec_hint(spec: str) -> str:
    """Suggest the prefixed spec when a bare name is a timm or torchvision model."""
    general = "use a .py path, timm:NAME, torchvision:NAME, or one of " + ", ".join(BUILTINS)
    if ":" in spec or "/" in spec:
        return general
    try:
        import timm

        if timm.is_model(spec):
            return f"did you mean timm:{spec}? ({general})"
    except ImportError:
        pass
    try:
        from torchvision import models

        if spec in models.list_models():
            return f"did you mean torchvision:{spec}? ({general})"
    except ImportError:
        pass
    return general


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The model's own input size: timm's pretrained_cfg, an ``input_size`` attribute, else 3x224x224
    for timm/torchvision models and 3x32x32 for the rest."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    size = getattr(model, "input_size", None)
    if isinstance(size, (tuple, list)) and all(isinstance(s, int) for s in size):
        return tuple(size)
    spec = getattr(model, "surgeon_source", {}).get("spec", "")
    if spec.startswith("torchvision:"):
        return (3, 224, 224)
    return (3, 32, 32)
