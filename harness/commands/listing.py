"""`harness list`: the registered adapters, their descriptions and config fields.

Reading the config fields means importing every adapter, and with it torch (about 2 s). The text
is cached (cache_dir("listing")) under a hash of the installed adapter entry points and every
source file of their packages and of this listing, so after the first call `list` answers
without torch, and any edit to an adapter makes the next call import and write it afresh."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import typing
from importlib.metadata import entry_points
from pathlib import Path

from harness import storage

ENTRY_POINT_GROUP = "harness.adapters"  # harness.api.registry's group; not imported from there (torch)
_HARNESS = Path(__file__).resolve().parents[1]


def _type_name(annotation) -> str:
    """int, float, one of a|b, ... for `harness list`."""
    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (tuple, list):
        return "list of " + _type_name(args[0])
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def listing_text() -> str:
    """What `harness list` prints, from the imported registry."""
    from harness.api import registry

    lines = []
    for name, cls in registry.available().items():
        lines.append(f"{name}: {cls.description}")
        if cls.sizing is not None:
            others = f" ({', '.join(cls.sizing.other_widths)} in proportion)" if cls.sizing.other_widths else ""
            lines.append(f"    (sized to an inference cost by {cls.sizing.width} in steps of 2 x {cls.sizing.heads}"
                         f"{others}, then {cls.sizing.depth})")
        for field, info in cls.Config.model_fields.items():
            default = f"{info.default:.4g}" if isinstance(info.default, float) else repr(info.default)
            help_text = f"  {info.description}" if info.description else ""
            lines.append(f"    {field} ({_type_name(info.annotation)}, default {default}){help_text}")
    return "\n".join(lines) + "\n"


def _source_files(module_name: str) -> list[Path]:
    """The .py files of a top-level module or package, found without importing it."""
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin else []


def listing_key() -> str:
    """A hash of everything the listing text depends on: the entry points and their sources, the
    harness's adapter API and this file."""
    digest = hashlib.sha256()
    sources = [*_HARNESS.joinpath("api").glob("*.py"), Path(__file__).resolve()]
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        digest.update(f"{ep.name}={ep.value}\n".encode())
        sources += _source_files(ep.value.split(":")[0].split(".")[0])
    for path in sorted(set(sources)):
        digest.update(f"{path}\n".encode() + path.read_bytes())
    return digest.hexdigest()


def cmd_list(args: argparse.Namespace) -> None:
    cached = storage.cache_dir("listing") / f"{listing_key()}.txt"
    if storage.file_damage(cached) is None and cached.is_file():
        print(cached.read_text(), end="")
        return
    text = listing_text()
    print(text, end="")
    try:
        storage.write_text_atomic(cached, text, hashed=True)
    except OSError:
        pass  # a read-only cache costs the next call 2 s, nothing else


def add_parser(subparsers) -> argparse.ArgumentParser:
    listing = subparsers.add_parser("list", help="list adapters with their config fields",
                             description="List the registered adapters (built-in and from the harness.adapters "
                                         "entry-point group) with a one-line description and their config fields.")
    listing.set_defaults(func=cmd_list)
    return listing
