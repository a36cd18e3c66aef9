#!/usr/bin/env python3
"""Hand-written SVG line chart of latency per 1-second bucket, one line per setup (stdlib only).

Usage: chart.py BUCKETS.csv OUT.svg [--class web] [--metric p99_ms] [--title TEXT]

BUCKETS.csv (from storm_analyze.py): setup,class,second,count,p50_ms,p95_ms,p99_ms.
The y axis is logarithmic (decades with 2x/5x minor lines); a second with no completed transaction
leaves a gap in the line.
"""
import argparse
import csv
import math
from collections import OrderedDict
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H = 960, 540
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 56, 64


def nice_step(span, target=10):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def label_ms(v):
    return f"{v:g}" if v >= 1 else f"{v:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("buckets")
    ap.add_argument("out")
    ap.add_argument("--class", dest="cls", default="web")
    ap.add_argument("--metric", default="p99_ms")
    ap.add_argument("--title", default="Latency per 1-s bucket")
    a = ap.parse_args()

    series = OrderedDict()
    with open(a.buckets, newline="") as f:
        for r in csv.DictReader(f):
            if r["class"] != a.cls:
                continue
            v = float(r[a.metric])
            series.setdefault(r["setup"], {})[int(r["second"])] = max(v, 1e-3)

    values = [v for s in series.values() for v in s.values()]
    xmax = max((x for s in series.values() for x in s), default=0) + 1
    lo = 10 ** math.floor(math.log10(min(values))) if values else 0.1
    hi = 10 ** math.ceil(math.log10(max(values))) if values else 1000
    if hi <= lo:
        hi = lo * 10
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def X(sec):  # bucket centre
        return LEFT + (sec + 0.5) / xmax * pw

    def Y(v):
        return TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{LEFT + pw / 2}" y="28" text-anchor="middle" font-size="16" font-weight="bold">'
         f'{escape(a.title)}</text>']
    # Horizontal grid: decades (labelled) and 2x/5x minors.
    d = math.floor(math.log10(lo))
    while 10 ** d <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10 ** d
            if v < lo * 0.9999 or v > hi * 1.0001:
                continue
            y = Y(v)
            major = m == 1
            o.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" '
                     f'stroke="{"#bbb" if major else "#e6e6e6"}" stroke-width="1"/>')
            if major or (math.log10(hi) - math.log10(lo)) <= 3:
                o.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" '
                         f'fill="{"#000" if major else "#777"}">{label_ms(v)}</text>')
        d += 1
    # Vertical grid and x labels.
    step = nice_step(xmax)
    t = 0
    while t <= xmax + 1e-9:
        x = LEFT + t / xmax * pw
        o.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eee"/>')
        o.append(f'<text x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{t:g}</text>')
        t += step
    o.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#000"/>')
    o.append(f'<text x="{LEFT + pw / 2}" y="{H - 18}" text-anchor="middle">'
             f'time since the web clients started (s)</text>')
    ylab = f"{a.cls} {a.metric.replace('_ms', '')} latency (ms, log scale)"
    o.append(f'<text transform="translate(22,{TOP + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylab)}</text>')
    # Lines, split where a bucket is missing.
    for i, (setup, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        run = []
        for sec in range(xmax + 1):
            if sec in pts:
                run.append(f"{X(sec):.1f},{Y(pts[sec]):.1f}")
            if (sec not in pts or sec == xmax) and run:
                if len(run) == 1:
                    cx, cy = run[0].split(",")
                    o.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
                else:
                    o.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(run)}"/>')
                run = []
        # Legend.
        ly = TOP + 10 + i * 22
        lx = LEFT + pw + 16
        o.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{color}" stroke-width="3"/>')
        o.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(setup)}</text>')
    if not series:
        o.append(f'<text x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle">no data</text>')
    o.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    main()
