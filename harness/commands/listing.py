"""`harness list`: the registered adapters, their descriptions and config fields."""

from __future__ import annotations

import argparse
import typing


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


def cmd_list(args: argparse.Namespace) -> None:
    from harness.api import registry

    for name, cls in registry.available().items():
        print(f"{name}: {cls.description}")
        if cls.sizing is not None:
            others = f" ({', '.join(cls.sizing.other_widths)} in proportion)" if cls.sizing.other_widths else ""
            print(f"    (sized to an inference cost by {cls.sizing.width} in steps of 2 x {cls.sizing.heads}{others}, "
                  f"then {cls.sizing.depth})")
        for field, info in cls.Config.model_fields.items():
            default = f"{info.default:.4g}" if isinstance(info.default, float) else repr(info.default)
            help_text = f"  {info.description}" if info.description else ""
            print(f"    {field} ({_type_name(info.annotation)}, default {default}){help_text}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    listing = subparsers.add_parser("list", help="list adapters with their config fields",
                             description="List the registered adapters (built-in and from the harness.adapters "
                                         "entry-point group) with a one-line description and their config fields.")
    listing.set_defaults(func=cmd_list)
    return listing
