"""Method plugins: one registered class per method (DESIGN.md).

Every module in this package registers its plugins when imported; they are all imported here,
so adding a method is adding a file.
"""
import importlib
import pkgutil

from bench.registry import Registry
from methods.base import Method

METHODS: Registry = Registry("method", base=Method)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "common"):
        importlib.import_module(f"methods.{_module}")


def build_method(name: str, hparams: dict | None = None):
    """Instantiate the registered method `name` with its hyper-parameters.

    `threshold` and `thresholds` are the harness's keys (the operating point of `bench run` and
    the sweep grid), not the method's: they become attributes and the plugin never sees them.
    """
    hparams = dict(hparams or {})
    threshold, thresholds = hparams.pop("threshold", None), hparams.pop("thresholds", None)
    method = METHODS.get(name)(hparams)
    method.threshold = threshold
    if thresholds is not None:
        if not isinstance(thresholds, (list, tuple)):
            raise ValueError(f"methods.{name}.thresholds must be a list of numbers, got {thresholds!r}")
        method.default_thresholds = tuple(thresholds)
    return method
