"""featcache: extract frozen vision-backbone features once, evaluate heads in seconds.

The public API (pinned in docs/architecture.md) is imported lazily so that ``import featcache`` stays
cheap: torch and transformers load only when a function that needs them is called.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_LAZY = {
    "open": ("featcache.store", "open_store"),
    "FeatureStore": ("featcache.store", "FeatureStore"),
    "extract": ("featcache.extraction", "extract"),
    "ExtractConfig": ("featcache.extraction", "ExtractConfig"),
    "knn_eval": ("featcache.knn", "knn_eval"),
    "logistic_probe": ("featcache.probe", "logistic_probe"),
    "LogisticProbe": ("featcache.probe", "LogisticProbe"),
    "train_head": ("featcache.train", "train_head"),
    "sweep": ("featcache.sweeping", "sweep"),
    "predict": ("featcache.prediction", "predict"),
    "run_knn": ("featcache.evaluation", "run_knn"),
    "run_probe": ("featcache.evaluation", "run_probe"),
    "few_shot": ("featcache.evaluation", "few_shot"),
    "compare": ("featcache.comparing", "compare"),
    "load_run": ("featcache.runs", "load_run"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
