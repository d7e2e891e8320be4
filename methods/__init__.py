"""Method plugins: one registered class per method (DESIGN.md)."""
from bench.registry import Registry

METHODS: Registry = Registry("method")

from methods import baseline  # noqa: E402,F401  (importing registers the plugins)


def build_method(name: str, hparams: dict | None = None):
    """Instantiate the registered method `name` with its hyper-parameters."""
    return METHODS.get(name)(hparams)
