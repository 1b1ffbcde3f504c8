"""A horizontal bar chart of speed ratios as standalone SVG (no plotting dependency)."""
from __future__ import annotations

from html import escape
from typing import Dict, List


def ratio_chart(results: List[Dict[str, object]], title: str) -> str:
    row, left, width, top = 22, 330, 420, 40
    top_ratio = max([1.0] + [float(r["ratio"]) for r in results] + [float(r["target"] or 0) for r in results]) * 1.1
    scale = width / top_ratio
    height = top + row * len(results) + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14">{escape(title)}</text>',
        f'<line x1="{left + scale:.1f}" y1="{top - 5}" x2="{left + scale:.1f}" y2="{height - 30}" stroke="#888" '
        'stroke-dasharray="4 3"/>',
        f'<text x="{left + scale - 12:.1f}" y="{height - 15}">1.0x</text>',
    ]
    for i, r in enumerate(results):
        y = top + i * row
        ratio = float(r["ratio"])
        color = "#888" if r["met"] is None else ("#2a7" if r["met"] else "#d54")
        parts.append(f'<text x="10" y="{y + 14}">{escape(str(r["case"]))}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{ratio * scale:.1f}" height="{row - 8}" fill="{color}"/>')
        parts.append(f'<text x="{left + ratio * scale + 4:.1f}" y="{y + 14}">{ratio:.2f}x</text>')
        if r["target"]:
            tx = left + float(r["target"]) * scale
            parts.append(f'<line x1="{tx:.1f}" y1="{y + 1}" x2="{tx:.1f}" y2="{y + row - 3}" stroke="#000" stroke-width="2"/>')
    parts.append(f'<text x="10" y="{height - 15}">bars: torch time / seqkernels time; black ticks: targets</text>')
    parts.append("</svg>")
    return "\n".join(parts)
