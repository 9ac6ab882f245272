"""The one registry of adapters (lm-evaluation-harness style: a typed registry with clear
errors, one source of truth).

Adapters come from the entry-point group `harness.adapters`. An entry point names either an
Adapter class (`my_model = "my_package.my_model:MyAdapter"`) or a package whose import
registers its adapters with @register; the built-in packages `baselines` and `byteflow` are
entry points of the second kind (pyproject.toml), and each imports its own modules. Code
that is not installed as a package (a test, a notebook) can call @register directly.
"""

from __future__ import annotations

import difflib
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import torch

from harness.api.adapter import Adapter
from harness.errors import HarnessError

ENTRY_POINT_GROUP = "harness.adapters"

_REGISTRY: dict[str, type[Adapter]] = {}
_discovered = False


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"{cls!r} is not an Adapter subclass")
    for attr in ("name", "description", "Config"):
        if not hasattr(cls, attr):
            raise TypeError(f"adapter {cls.__name__} lacks the class attribute {attr!r}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"adapter name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()  # a package registers its adapters as it is imported
        if isinstance(loaded, type) and issubclass(loaded, Adapter) and loaded.name not in _REGISTRY:
            register(loaded)


def available() -> dict[str, type[Adapter]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Adapter]:
    adapters = available()
    if name not in adapters:
        close = difflib.get_close_matches(name, adapters, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise HarnessError(f"unknown adapter {name!r} (known: {', '.join(adapters)}){hint}")
    return adapters[name]


def build(name: str, config: dict) -> Adapter:
    cls = get(name)
    return cls(cls.Config(**config))


def load_state(path: Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's tensors and plain values, loaded without executing pickled code."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler (struct.error, IndexError, KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if reason.startswith("Weights only load failed"):
            reason = "it holds pickled objects besides tensors and plain values; they are not loaded, as that could run code"
        raise HarnessError(f"{path}: not a loadable checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict):
        raise HarnessError(f"{path}: not a loadable checkpoint (it holds a {type(state).__name__}, not a mapping of tensors)")
    return state


def load_checkpoint(run_dir: Path, device: str | torch.device = "cpu") -> Adapter:
    """Rebuild a trained adapter from a run directory (record.json + model.pt)."""
    from harness.core.records import read_record

    record = read_record(run_dir / "record.json")
    model = build(record.model.adapter, record.model.config)
    checkpoint = run_dir / "model.pt"
    if not checkpoint.exists():
        raise HarnessError(f"{run_dir}: no model.pt checkpoint (was the run finished?)")
    try:
        model.load_state_dict(load_state(checkpoint, device))
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:  # e.g. a tokenizer state that is not one
        raise HarnessError(f"{checkpoint}: does not fit adapter {record.model.adapter!r} "
                           f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
