"""The early-exit engine: one executor for every method and backbone (DESIGN.md)."""
from bench.engine.executor import EarlyExitModel, ExitRecord

__all__ = ["EarlyExitModel", "ExitRecord"]
