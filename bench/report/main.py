"""`bench report`: render the chosen tables and figures, write them under <results>/reports, list the rest.

Files: table{N}.md and table{N}.tex (table{N}-{datasets}.* when --dataset replaces the paper's
datasets), figure PNGs (see figures.py and tradeoff.py for their names), and index.md: what was made
and what could not be made, and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.atomic import atomic_write
from bench.report import FIGURES, TABLES
from bench.report.figures import CannotMake, FigureContext
from bench.report.load import load_results
from bench.report.render import to_latex, to_markdown
from bench.report.select import OperatingPoint
from bench.report.tables import build_table


@dataclass
class Report:
    made: list[tuple[str, list[Path], str]] = field(default_factory=list)   # (what, files, remark)
    not_made: list[tuple[str, str]] = field(default_factory=list)           # (what, why)
    markdown: dict[str, str] = field(default_factory=dict)                  # table number -> Markdown

    def summary(self) -> str:
        lines = ["made:"] + [f"  {what:9s} {', '.join(p.name for p in files)}" + (f"  ({remark})" if remark else "")
                             for what, files, remark in self.made]
        if not self.made:
            lines.append("  (nothing)")
        lines += ["could not make:"] + [f"  {what:9s} {why}" for what, why in self.not_made]
        if not self.not_made:
            lines.append("  (nothing left out)")
        return "\n".join(lines)


def parse_choices(values, registry) -> list[str]:
    """'1,3' and repeated options -> ['1', '3'], each checked against the registry (did-you-mean error)."""
    out = []
    for value in values or []:
        for item in str(value).split(","):
            item = item.strip()
            if item:
                registry.get(item)
                out.append(item)
    return list(dict.fromkeys(out))


def make_report(results_dir: str | Path = "results", out: str | Path | None = None, tables=None, figures=None,
                everything: bool = False, paper: bool = False, operating_point: str | None = None,
                datasets: list[str] | None = None, profile: str | None = None, experiment: str | None = None,
                echo: Callable[[str], None] = print) -> Report:
    """Render tables and figures from the CSVs under `results_dir`; nothing chosen means everything."""
    table_numbers, figure_numbers = parse_choices(tables, TABLES), parse_choices(figures, FIGURES)
    rule = OperatingPoint.parse(operating_point)
    if everything or not (table_numbers or figure_numbers):
        table_numbers, figure_numbers = TABLES.names(), FIGURES.names()
    results = load_results(results_dir, profile=profile, experiment=experiment)
    out = Path(out) if out else Path(results_dir) / "reports"
    report = Report()
    for number in table_numbers:
        spec = TABLES.get(number)
        table = build_table(spec, results, rule, datasets, paper)
        stem = f"table{number}" + (f"-{'-'.join(datasets)}" if datasets else "")
        markdown = to_markdown(table)
        files = [atomic_write(out / f"{stem}.md", lambda f: f.write(markdown), binary=False),
                 atomic_write(out / f"{stem}.tex", lambda f: f.write(to_latex(table)), binary=False)]
        report.markdown[number] = markdown
        echo(markdown)
        remark = f"{table.filled} of {table.total} cells have a run"
        report.made.append((f"table {number}", files, remark))
        if not table.filled:
            report.not_made.append((f"table {number}", f"no cell has a run (written with its 'no run yet' cells): "
                                                         f"{table.notes[-1]}"))
    for number in figure_numbers:
        ctx = FigureContext(results, out, rule, datasets)
        try:
            files = FIGURES.get(number)(ctx)
        except CannotMake as why:
            report.not_made.append((f"figure {number}", str(why)))
            continue
        report.made.append((f"figure {number}", files, ""))
        report.not_made += [(f"figure {number}", f"(part) {why}") for why in ctx.skipped]
    index = f"# Report of {Path(results_dir)}\n\n```\n{report.summary()}\n```\n"
    atomic_write(out / "index.md", lambda f: f.write(index), binary=False)
    echo(report.summary())
    return report
