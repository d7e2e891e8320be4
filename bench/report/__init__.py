"""Reporters: the paper's tables and figures, drawn from the results CSVs only (`bench report`).

Tables (bench/report/tables.py) and figures (figures.py: 1, 3, 4; tradeoff.py: 5, 6, 7) are
registered by number; `make_report` (bench/report/main.py) renders the chosen ones. The report
imports no model code: it reads runs.csv, the per-call CSVs and the files the rows point to.
"""
from bench.registry import Registry

TABLES: Registry = Registry("table")
FIGURES: Registry = Registry("figure")

from bench.report import figures, tables, tradeoff  # noqa: E402,F401  (register the reporters)
from bench.report.main import make_report  # noqa: E402,F401
