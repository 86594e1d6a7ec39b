"""Every dataset layout, one module each (`data/registry.py` says what a layout declares and
registers it): this package imports every module in it, so a new layout is one more module here
(its reader may live in it too) and is at once a `config.dataset.layout` choice, guessed from a
folder in error messages, prepared as a TFDS store when it declares a builder, and run by
tests/test_registered.py on its miniature tree."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "miniature":  # the writers' shared helpers, not a layout
        importlib.import_module(f"{__name__}.{_module.name}")
