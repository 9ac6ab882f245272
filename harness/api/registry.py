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
from importlib.metadata import entry_points


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
