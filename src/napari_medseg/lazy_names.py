"""A package's names loaded from their modules on first use (PEP 562): ``import napari_medseg.inference``
stays instant (no torch) until a name that needs it is read, e.g. for ``medseg --help``."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str]):
    """The module ``__getattr__`` of ``package`` that reads ``exports`` (name -> its module, relative
    to the package) from their modules when first asked for."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    return __getattr__
