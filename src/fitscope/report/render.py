"""The study report's text: markdown (reports/study.md) and self-contained HTML
(reports/study.html), from the tables, figures and champions report.study gathered."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from fitscope.results.bands import mean_std
from fitscope.results.verdict import VERDICT_RULE
from fitscope.tracking.store import where_to_look


@dataclass
class Block:
    """A part of a section: a heading (a dataset, a diagnostic), a table, a figure and
    plain sentences on what they show."""

    title: str
    rows: list[dict[str, str]] = field(default_factory=list)
    figure: Path | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class Section:
    """A section of the report: its title, one sentence on what it shows, its blocks."""

    title: str
    sentence: str
    blocks: list[Block] = field(default_factory=list)


def fmt_mean(mean: float, std: float, seeds: int, digits: int = 4) -> str:
    """A table cell: ``mean ± std`` over several seeds, the value alone over one."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def mean_cell(values: list[float], digits: int = 4) -> str:
    """``fmt_mean`` of the seeds' ``values``."""
    return fmt_mean(*mean_std(values), len(values), digits)


def table_md(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[k] for k in head) + " |" for row in rows]
    return "\n".join(lines)


def table_html(rows: list[dict[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_md(section: Section) -> list[str]:
    md = [f"## {section.title}\n", f"{section.sentence}\n"]
    for block in section.blocks:
        md.append(f"### {block.title}\n")
        if block.rows:
            md += [table_md(block.rows), ""]
        if block.figure is not None:
            md.append(f"![{block.title}](figures/{block.figure.name})\n")
        md += [f"- {line}" for line in block.lines]
        if block.lines:
            md.append("")
    return md


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.sentence)}</p>"]
    for block in section.blocks:
        parts.append(f"<h3>{html.escape(block.title)}</h3>")
        if block.rows:
            parts.append(table_html(block.rows))
        if block.figure is not None:
            parts.append(_image(block.figure, block.title))
        if block.lines:
            items = "".join(f"<li>{html.escape(x.replace('**', ''))}</li>" for x in block.lines)
            parts.append(f"<ul>{items}</ul>")
    return "".join(parts)


def markdown(
    profile: str,
    seeds: int,
    tables: dict,
    figures: dict,
    champions: dict,
    sections: list[Section],
) -> str:
    banner = (
        ""
        if profile == "classic"
        else f"> **{profile} profile**: shortened runs (fewer epochs, smaller patience) for a "
        "demo; these numbers are not the classic study. Run `dvc repro` with "
        "`study.profile: classic` for the real protocol.\n\n"
    )
    md = [
        f"# fitscope study report ({profile} profile)\n",
        banner,
        f"Seeds per variant: {seeds}"
        + (" (values are mean ± std; figures draw the mean and a ± std band)" if seeds > 1 else "")
        + ". Validation = the split early stopping watches; test = the held-out split "
        "scored once, by the training job, with the restored weights. Val columns are at "
        "the selected epoch: the best one, whose weights were restored (HIGGS presets), "
        "or the last one (the MNIST presets "
        "train a fixed number of epochs, as the classic experiments did; there the 100 "
        "held-out validation digits play the role of the classic test curve). Binary "
        "accuracy thresholds the probability at 0.5.\n",
        f"Verdict rule: {VERDICT_RULE}\n",
    ]
    for dataset, rows in tables.items():
        md += [f"## {dataset.upper()}\n", table_md(rows), ""]
    for section in sections:
        md += _section_md(section)
    md.append("## Learning curves\n")
    for study_name, png in figures.items():
        md += [f"### {study_name}\n", f"![{study_name}](figures/{png.name})\n"]
    md.append("## Registered champions\n")
    md += [f"- {d}: `{c}`" for d, c in champions.items()] or ["- none (runs were not tracked)"]
    md.append(f"\nCompare runs interactively: {where_to_look()}.\n")
    return "\n".join(md)


def _image(path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def page_html(
    profile: str, tables: dict, figures: dict, champions: dict, sections: list[Section]
) -> str:
    figs_html = "".join(f"<h3>{html.escape(s)}</h3>{_image(p, s)}" for s, p in figures.items())
    tables_html = "".join(f"<h2>{d.upper()}</h2>{table_html(rows)}" for d, rows in tables.items())
    champs_html = "".join(f"<li><code>{html.escape(c)}</code></li>" for c in champions.values())
    demo = (
        f"<p><b>{html.escape(profile)} profile</b>: shortened runs for a demo; not the "
        "classic study.</p>"
        if profile != "classic"
        else ""
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fitscope study</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:900px}</style></head><body>"
        f"<h1>fitscope study report ({html.escape(profile)} profile)</h1>"
        + demo
        + f"<p>Verdict rule: {html.escape(VERDICT_RULE.replace('**', ''))}</p>"
        + tables_html
        + "".join(_section_html(section) for section in sections)
        + "<h2>Learning curves</h2>"
        + figs_html
        + f"<h2>Registered champions</h2><ul>{champs_html or '<li>none</li>'}</ul>"
        + "</body></html>"
    )
