"""Registering dlnc's loader with transformers without importing transformers.

`transformers.quantizers.auto` costs seconds and pulls in accelerate, and `import compressor`
must stay light. So `import compressor` only puts a finder on `sys.meta_path`: the moment
anything imports that module (every `from_pretrained` does), the dlnc quantizer and its config
are registered right after it. If it is already imported, they are registered at once.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType

__all__ = ["register_when_imported"]

TARGET = "transformers.quantizers.auto"


def register_when_imported() -> None:
    """Register the `dlnc` quantizer with transformers now, or when it is first imported."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


def _register() -> None:
    hf = sys.modules.get("compressor.io.hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # compressor.io.hf is importing transformers' quantizers: it registers at its end
    from compressor.io.hf import register

    register()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds TARGET through the other finders and runs `_register` after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # get_source, is_package, ... of the real loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PostImportFinder)]
        _register()
