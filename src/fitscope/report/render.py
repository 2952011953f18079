"""The study report's text: markdown (reports/study.md) and self-contained HTML
(reports/study.html), from the tables, figures and champions report.study gathered."""

from __future__ import annotations

import base64
import html

from fitscope.report.calibration import SENTENCE as CALIBRATION
from fitscope.report.early_stopping import SENTENCE as EARLY_STOPPING
from fitscope.results.verdict import VERDICT_RULE
from fitscope.tracking.store import where_to_look


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


def markdown(
    profile: str,
    seeds: int,
    tables: dict,
    figures: dict,
    champions: dict,
    early: dict,
    calibration: dict,
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
        + (" (values are mean ± std)" if seeds > 1 else "")
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
    md += ["## Early stopping\n", f"{EARLY_STOPPING}\n"]
    for dataset, rows in early.items():
        md += [f"### {dataset.upper()}\n", table_md(rows), ""]
    md += ["## Calibration\n", f"{CALIBRATION}\n"]
    for dataset, section in calibration.items():
        md += [f"### {dataset.upper()}\n", table_md(section["rows"]), ""]
        if section["figure"] is not None:
            md.append(f"![calibration {dataset}](figures/{section['figure'].name})\n")
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
    profile: str, tables: dict, figures: dict, champions: dict, early: dict, calibration: dict
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
        + f"<h2>Early stopping</h2><p>{html.escape(EARLY_STOPPING)}</p>"
        + "".join(f"<h3>{d.upper()}</h3>{table_html(rows)}" for d, rows in early.items())
        + f"<h2>Calibration</h2><p>{html.escape(CALIBRATION)}</p>"
        + "".join(
            f"<h3>{d.upper()}</h3>{table_html(c['rows'])}"
            + (_image(c["figure"], f"calibration {d}") if c["figure"] is not None else "")
            for d, c in calibration.items()
        )
        + "<h2>Learning curves</h2>"
        + figs_html
        + f"<h2>Registered champions</h2><ul>{champs_html or '<li>none</li>'}</ul>"
        + "</body></html>"
    )
