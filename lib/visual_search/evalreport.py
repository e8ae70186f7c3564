"""Rendering of an evaluation report (evaluation.run's dict): the progress lines, summary.md,
recall.png, and the three files written atomically."""

from __future__ import annotations

import io
from collections.abc import Callable

from visual_search import storage


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _metric_line(summary: dict, ks: list[int], rank_key: str) -> str:
    parts = [f"{rank_key.replace('map', 'mAP')} {_fmt(summary[rank_key])}"]
    parts += [f"recall@{k} {_fmt(summary[f'recall@{k}'])}" for k in ks]
    parts += [f"precision@{k} {_fmt(summary[f'precision@{k}'])}" for k in ks]
    return " ".join(parts) + f" ({summary['queries']} queries, {summary['no_relevant']} without)"


def print_summary(r: dict, say: Callable[[str], None]) -> None:
    """The report's progress lines, through say."""
    rank_key = r["worst_categories"]["by"]
    errors = f"{r['errors']} errors {r['errors_by_code']}" if r["errors"] else "no errors"
    say(f"{r['queries']} queries, {r['evaluated']} evaluated, {errors}")
    for level in ("instance", "category"):
        if r[level] is not None:
            say(f"{level} {_metric_line(r[level], r['ks'], rank_key)}")
    if r["predicted_category_accuracy"] is not None:
        say(f"predicted category accuracy {r['predicted_category_accuracy']:.3f}")
    if r["index_recall_at_10"] is not None:
        say(f"index recall@10 vs exact search {r['index_recall_at_10']:.4f}")
    else:
        say(f"index recall@10 vs exact search not measured: {r['index_recall_note']}")
    lat = r["latency_ms"]
    say(
        "latency ms "
        + " ".join(
            f"{stage} p50 {v['p50']:.2f} p99 {v['p99']:.2f}" for stage, v in lat.items() if v
        )
    )
    worst = r["worst_categories"]["rows"]
    if worst:
        shown = ", ".join(f"{w['category']} {_fmt(w[rank_key])}" for w in worst)
        say(f"worst categories by {r['worst_categories']['level']} {rank_key}: {shown}")


def summary_markdown(r: dict) -> str:
    """The report as Markdown: metric table, index recall, latency, the 10 worst categories."""
    ks = r["ks"]
    lines = [
        f"# Retrieval quality of index version `{r['version']}`",
        "",
        f"- index: `{r['index_root']}`, {r['count']:,} vectors, `{r['factory']}`, "
        f"{r['shards']} shard(s), model `{r['model']['model_id']}`",
        f"- queries: {r['queries']} ({r['mode']}), "
        f"{r['evaluated']} evaluated, {r['errors']} errors"
        + (f" {r['errors_by_code']}" if r["errors"] else ""),
        f"- re-rank: top {r['rerank']} by geometric verification"
        if r["rerank"]
        else "- re-rank: off",
        f"- index recall@10 vs exact search: {_fmt(r['index_recall_at_10'])}"
        + (f" ({r['index_recall_note']})" if r["index_recall_note"] else ""),
        f"- predicted category accuracy: {_fmt(r['predicted_category_accuracy'])}",
        "",
        "| level | metric | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for level in ("instance", "category"):
        s = r[level]
        if s is None:
            continue
        for name, key in (("recall", "recall"), ("precision", "precision"), ("mAP", "map")):
            cells = " | ".join(_fmt(s[f"{key}@{k}"]) for k in ks)
            lines.append(f"| {level} ({s['queries']} q) | {name}@k | {cells} |")
    lines += ["", "| latency (ms/query) | p50 | p99 |", "|---|---|---|"]
    for stage, v in r["latency_ms"].items():
        if v:
            lines.append(f"| {stage} | {v['p50']:.2f} | {v['p99']:.2f} |")
    worst = r["worst_categories"]
    if worst["rows"]:
        key = worst["by"]
        lines += [
            "",
            f"## {len(worst['rows'])} worst categories by {worst['level']} {key}",
            "",
            f"| category | queries | {key} | recall@{ks[0]} |",
            "|---|---|---|---|",
        ]
        for w in worst["rows"]:
            entry = r["per_category"][w["category"]][worst["level"]]
            lines.append(
                f"| {w['category']} | {w['queries']} | {_fmt(w[key])} | "
                f"{_fmt(entry[f'recall@{ks[0]}'])} |"
            )
    return "\n".join(lines) + "\n"


def recall_png(r: dict) -> bytes:
    """recall@k curves (instance, category) and the worst categories' mAP as a bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for level in ("instance", "category"):
        s = r[level]
        if s is not None:
            ys = [s[f"recall@{k}"] for k in r["ks"]]
            left.plot(r["ks"], ys, marker="o", label=f"{level} ({s['queries']} queries)")
    left.set_xscale("log")
    left.set_xticks(r["ks"], [str(k) for k in r["ks"]])
    left.set_ylim(0, 1.02)
    left.set_xlabel("k")
    left.set_ylabel("recall@k")
    left.set_title(f"version {r['version']}", fontsize=9)
    left.grid(alpha=0.3)
    if r["instance"] is not None or r["category"] is not None:
        left.legend(loc="lower right")
    worst = r["worst_categories"]
    key = worst["by"]
    if worst["rows"]:
        names = [w["category"] for w in worst["rows"]][::-1]
        values = [w[key] for w in worst["rows"]][::-1]
        right.barh(names, values, color="tab:red")
        right.set_xlim(0, 1)
        right.set_xlabel(f"{worst['level']} {key.replace('map', 'mAP')}")
        right.set_title(f"{len(names)} worst categories")
    else:
        right.text(0.5, 0.5, "no categories", ha="center", va="center")
        right.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_outputs(out: str, report: dict) -> None:
    """report.json, summary.md and recall.png under `out`, each written atomically."""
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_text(storage.join(out, "summary.md"), summary_markdown(report))
    storage.write_bytes(storage.join(out, "recall.png"), recall_png(report))
