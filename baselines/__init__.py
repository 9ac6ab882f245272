"""Baseline adapters, one file each. Importing the package (the `harness.adapters` entry
point `baselines`) imports every module in it, and each adapter registers itself with
@harness.api.register: adding a baseline is adding a file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
