"""A filled table (tables.TableData) as Markdown and as LaTeX (booktabs), notes under the table."""
from __future__ import annotations

import re

from bench.report.tables import TableData


def to_markdown(table: TableData) -> str:
    headers = ["method"] + [f"{group}: {metric}" for group, metrics in table.groups for metric in metrics]
    lines = [f"### {table.title}", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + [":--" if h.endswith(": run") else "--:" for h in headers[1:]]) + "|"]
    lines += ["| " + " | ".join([label] + [c.replace("|", "\\|") for c in cells]) + " |" for label, cells in table.rows]
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "—": "---", "Δ": r"$\Delta$", "≈": r"$\approx$", "‡": r"\ddag{}"}


def latex_escape(text: str) -> str:
    text = re.sub("|".join(re.escape(k) for k in _LATEX_SPECIAL), lambda m: _LATEX_SPECIAL[m.group()], str(text))
    return re.sub(r"`([^`]*)`", r"\\texttt{\1}", text)


def to_latex(table: TableData) -> str:
    width = sum(len(metrics) for _, metrics in table.groups)
    spec = "l" + "".join("l" + "r" * (len(m) - 1) for _, m in table.groups)
    top = " & ".join([""] + [rf"\multicolumn{{{len(m)}}}{{c}}{{{latex_escape(g)}}}" for g, m in table.groups])
    rules, col = [], 2
    for _, metrics in table.groups:
        rules.append(rf"\cmidrule(lr){{{col}-{col + len(metrics) - 1}}}")
        col += len(metrics)
    head = " & ".join(["method"] + [latex_escape(m) for _, metrics in table.groups for m in metrics])
    body = [" & ".join([latex_escape(label)] + [latex_escape(c) for c in cells]) + r" \\" for label, cells in
            table.rows]
    notes = [rf"\par {latex_escape(note)}" for note in table.notes]
    return "\n".join([
        r"% requires \usepackage{booktabs,graphicx}",
        r"\begin{table}[t]", r"\centering", r"\scriptsize",
        rf"\caption{{{latex_escape(table.title)}}}",
        rf"\label{{tab:eebench-{table.number}}}",
        r"\resizebox{\linewidth}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}", r"\toprule", top + r" \\", " ".join(rules), head + r" \\", r"\midrule",
        *body, r"\bottomrule", r"\end{tabular}}", "", r"\vspace{2pt}\begin{minipage}{\linewidth}\tiny",
        *notes, r"\end{minipage}", r"\end{table}", ""]) if width else ""
