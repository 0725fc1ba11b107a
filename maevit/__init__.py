"""maevit: masked-autoencoder pretraining and fine-tuning of vision transformers.

``import maevit`` is cheap: the names below load their modules (torch, timm, the model registry) on
first use, so ``maevit --help`` and notebooks that only need one part do not pay for all of them.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "MAEOutput": "maevit.models", "MaskedAutoencoder": "maevit.models", "create_mae": "maevit.models",
    "list_models": "maevit.models", "patchify": "maevit.models", "unpatchify": "maevit.models",
    "load": "maevit.loading", "transforms_for": "maevit.loading",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # AttributeError lets `from maevit import demo` import the submodule
        raise AttributeError(f"module 'maevit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
