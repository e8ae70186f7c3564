"""The human side of a dedup output: report.html (thumbnails, shares, PR curve) and summary.md."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter

from PIL import Image

from visual_search import images, storage

THUMB = 96


def thumbnail_uri(image_uri: str, size: int = THUMB) -> str | None:
    """A small JPEG of the photo as a data: URI (None when it cannot be read or decoded)."""
    try:
        img = images.to_rgb(images.decode(storage.read_bytes(image_uri, max_bytes=50 << 20)))
    except (OSError, ValueError):
        return None
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def category_shares(categories: dict[str, str | None], grouped: set[str]) -> list[dict]:
    """Per category: products, products in a group, share (largest share first)."""
    total, dup = Counter(), Counter()
    for pid, cat in categories.items():
        key = cat if cat is not None else "(none)"
        total[key] += 1
        dup[key] += pid in grouped
    rows = [
        {"category": c, "products": n, "duplicated": dup[c], "share": dup[c] / n}
        for c, n in total.items()
    ]
    return sorted(rows, key=lambda r: (-r["share"], r["category"]))


def pr_svg(curve: list[dict], chosen: float | None = None, w: int = 360, h: int = 260) -> str:
    """Precision (y) against recall (x) as an inline SVG; the chosen threshold is marked."""
    pad = 36

    def xy(p: dict) -> tuple[float, float]:
        return pad + p["recall"] * (w - 2 * pad), h - pad - p["precision"] * (h - 2 * pad)

    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, sorted(curve, key=lambda p: p["recall"])))
    mark = ""
    for p in curve:
        if chosen is not None and abs(p["threshold"] - chosen) < 1e-9:
            x, y = xy(p)
            mark = (
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="red">'
                f"<title>t={chosen}</title></circle>"
            )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
        f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" '
        f'stroke="#999"/><polyline points="{pts}" fill="none" stroke="#1565c0" stroke-width="2"/>'
        f'{mark}<text x="{w / 2}" y="{h - 8}" text-anchor="middle" font-size="12">recall</text>'
        f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" '
        f'text-anchor="middle">precision</text></svg>'
    )


def render_html(
    summary: dict,
    groups: list[dict],
    photo_of: dict[str, str],
    shares: list[dict],
    curve: list[dict] | None = None,
    largest: int = 30,
) -> str:
    """report.html: counts, the largest groups as thumbnails, shares per category, curve."""
    esc = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Near-duplicate groups</title>",
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:4px;"
        "font-size:11px;text-align:center}img{border:1px solid #ccc}</style></head><body>",
        f"<h1>Near-duplicate groups of version {esc(str(summary['version']))}</h1>",
        f"<p>copy-score threshold {summary['threshold']} (pairs verified from cosine "
        f"{summary.get('embedding_threshold')}), {summary['groups']} groups, "
        f"{summary['grouped_products']} of {summary['products']} products in a group.</p>",
        "<h2>Largest groups</h2>",
    ]
    ranked = sorted(groups, key=lambda g: (-len(g["members"]), g["group_id"]))[:largest]
    for g in ranked:
        out.append(f"<div><h3>group {g['group_id']} ({len(g['members'])} products)</h3>")
        for pid, sc in sorted(g["members"].items(), key=lambda m: (-m[1], m[0])):
            src = thumbnail_uri(photo_of[pid]) if pid in photo_of else None
            img = f"<img src='{src}' alt='{esc(pid)}'>" if src else "<span>(no image)</span>"
            rep = " (rep)" if pid == g["representative"] else ""
            out.append(f"<figure>{img}<figcaption>{esc(pid)}{rep} {sc:.3f}</figcaption></figure>")
        out.append("</div>")
    out.append("<h2>Share of duplicated products per category</h2><table border='1'>")
    out.append("<tr><th>category</th><th>products</th><th>in a group</th><th>share</th></tr>")
    for r in shares:
        out.append(
            f"<tr><td>{esc(r['category'])}</td><td>{r['products']}</td>"
            f"<td>{r['duplicated']}</td><td>{r['share']:.1%}</td></tr>"
        )
    out.append("</table>")
    if curve:
        out.append("<h2>Precision / recall over thresholds (calibration)</h2>")
        out.append(pr_svg(curve, summary["threshold"]))
    out.append("</body></html>")
    return "\n".join(out)


def render_summary(summary: dict, groups: list[dict], shares: list[dict], top: int = 10) -> str:
    lines = [
        f"# Near-duplicate groups: version {summary['version']}",
        "",
        f"- copy-score threshold: {summary['threshold']} (mutual top-{summary['k']} products, "
        "every two members of a group verified)",
        f"- pairs at cosine >= {summary.get('embedding_threshold')}: "
        f"{summary.get('pairs_above_embedding_threshold')} of {summary.get('pairs')} candidates,"
        f" all copy-verified ({summary.get('verified_pairs')} in this run, the rest reused)",
        f"- products: {summary['products']}, items: {summary['items']}",
        f"- groups: {summary['groups']}, products in a group: {summary['grouped_products']}",
        f"- queried items: {summary['queried_items']} (reused from {summary['reused_from']})",
        f"- time: {summary['timings']['total_s']} s",
        "",
        "## Largest groups",
        "",
    ]
    for g in sorted(groups, key=lambda g: (-len(g["members"]), g["group_id"]))[:top]:
        names = ", ".join(sorted(g["members"]))
        lines.append(f"- group {g['group_id']} (rep {g['representative']}): {names}")
    lines += ["", "## Share per category", "", "| category | products | in a group | share |"]
    lines.append("|---|---|---|---|")
    for r in shares:
        lines.append(
            f"| {r['category']} | {r['products']} | {r['duplicated']} | {r['share']:.1%} |"
        )
    return "\n".join(lines) + "\n"
