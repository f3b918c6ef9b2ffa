"""Self-contained HTML reports (inline CSS and PNG plots; open the file, no server needed)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .metrics import COLUMNS, format_cell

STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em}"
    "td.num{text-align:right;white-space:nowrap}th{background:#f3f3f3}"
    "td.text{max-width:30em;font-family:monospace;font-size:90%}caption{text-align:left;"
    "font-weight:bold}"
)


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _new_figure(size=(7, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def length_plot(by_length: list[dict]) -> bytes:
    """Mean BLEU of each method by the hidden prompt's length in target tokens."""
    fig, ax = _new_figure()
    labels = [r["tokens"] for r in by_length]
    methods = list(by_length[0]["bleu"]) if by_length else []
    for m in methods:
        ax.plot(labels, [r["bleu"][m] for r in by_length], "-o", label=m)
    ax.set_xlabel("hidden prompt length (target tokens)")
    ax.set_ylabel("mean sentence BLEU")
    ax.set_title("Recovery by prompt length")
    ax.legend(fontsize=7)
    return figure_png(fig)


def _summary_table(summary: dict) -> str:
    keys = [k for k in COLUMNS if all(k in m for m in summary.values())]
    head = "".join(f"<th>{html.escape(COLUMNS[k][0])}</th>" for k in keys)
    rows = []
    for method, m in summary.items():
        cells = "".join(f"<td class='num'>{format_cell(m[k], COLUMNS[k][1])}</td>" for k in keys)
        rows.append(f"<tr><td>{html.escape(method)}</td>{cells}</tr>")
    return (
        "<table id='summary'><caption>Metrics (mean [95% bootstrap CI])</caption>"
        f"<tr><th>method</th>{head}</tr>{''.join(rows)}</table>"
    )


def _group_table(field: str, groups: list[dict]) -> str:
    methods = list(groups[0]["bleu"])
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = "".join(
        f"<tr><td>{html.escape(g['group'])}</td><td class='num'>{g['n']}</td>"
        + "".join(f"<td class='num'>{g['bleu'][m]:.1f}</td>" for m in methods)
        + "</tr>"
        for g in groups
    )
    return (
        f"<table id='by-group'><caption>Mean BLEU by {html.escape(field)}</caption>"
        f"<tr><th>{html.escape(field)}</th><th>n</th>{head}</tr>{rows}</table>"
    )


def _examples_table(kind: str, items: list[dict]) -> str:
    methods = list(items[0]["predictions"]) if items else []
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = "".join(
        f"<tr><td class='text'>{html.escape(e['hidden'])}</td>"
        + "".join(
            f"<td class='text'>{html.escape(str(e['predictions'][m]))}"
            f"<br><small>BLEU {e['bleu'][m]:.1f}</small></td>"
            for m in methods
        )
        + "</tr>"
        for e in items
    )
    return (
        f"<table class='examples' id='examples-{kind}'><caption>{kind.title()} examples "
        f"(by inverter BLEU)</caption><tr><th>hidden prompt</th>{head}</tr>{rows}</table>"
    )


def evaluation_html(results: dict) -> str:
    """The evaluate report: metrics with CIs, a length plot, breakdown by group, examples."""
    cfg, corpus, target = results["config"], results["corpus"], results["target"]
    intro = (
        f"<p>Checkpoint <code>{html.escape(cfg['checkpoint'])}</code> on "
        f"<code>{html.escape(str(corpus['source']))}</code> ({corpus['n']} prompts); target "
        f"{html.escape(target['name'])} ({html.escape(target['mode'])} mode). BLEU is sacrebleu "
        "sentence BLEU averaged; token F1 is set overlap of word tokens; cosine is "
        "all-MiniLM-L6-v2; KL is KL(target|hidden || target|recovered) of the next-token "
        "distributions; top-1 is how often they agree on the top token.</p>"
    )
    if results.get("best_attack"):
        intro += (
            f"<p>Best extraction string (chosen on this set): "
            f"<code>{html.escape(results['best_attack'])}</code></p>"
        )
    parts = [intro, _summary_table(results["summary"])]
    if results["by_length"]:
        parts.append("<h2>By prompt length</h2>")
        parts.append(png_tag(length_plot(results["by_length"]), "BLEU by prompt length"))
    if results.get("by_group"):
        parts.append(f"<h2>By {html.escape(results['group_field'])}</h2>")
        parts.append(_group_table(results["group_field"], results["by_group"]))
    parts.append("<h2>Examples</h2>")
    for kind, items in results["examples"].items():
        parts.append(_examples_table(kind, items))
    return page("logit2prompt evaluation", "".join(parts))


def write_report(results: dict, path: str | Path) -> None:
    Path(path).write_text(evaluation_html(results), encoding="utf-8")
