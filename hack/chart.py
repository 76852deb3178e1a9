#!/usr/bin/env python3
"""Draws requests per second per version over time, as an SVG, from hack/load.py's output.

    hack/chart.py --out requests.svg --phases phases.txt load-healthy.jsonl load-bad.jsonl

Each input is a file of load.py's JSON lines (added up by second, by their Unix time `at`). One line
per version that answered, and failed requests in red, like the panel people watch during a canary.
--phases names a file of "UNIX_TIME PHASE WEIGHT" lines (hack/demo.sh writes it while it follows a
release): each change of phase is marked with a dashed line and its name. Standard library only.
"""

import argparse
import json
from html import escape

PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22"]
FAILED = "#d62728"


def load(paths):
    seconds = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            entries = [json.loads(line) for line in f if line.strip()]
        # The first and last seconds of a load are partial: leave them out.
        ends = {min(e["at"] for e in entries), max(e["at"] for e in entries)} if entries else set()
        for entry in entries:
            if entry["at"] in ends:
                continue
            bucket = seconds.setdefault(entry["at"], {"ok": {}, "failed": 0})
            bucket["failed"] += entry["failed"]
            for version, n in entry["ok"].items():
                bucket["ok"][version] = bucket["ok"].get(version, 0) + n
    return seconds


def phases(path):
    changes, last = [], None
    if not path:
        return changes
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            at, phase = float(parts[0]), parts[1]
            if phase != last:
                changes.append((at, phase))
                last = phase
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="SVG file to write")
    parser.add_argument("--title", default="requests per second by version")
    parser.add_argument("--phases", help='file of "UNIX_TIME PHASE WEIGHT" lines')
    parser.add_argument("inputs", nargs="+", help="load.py output files")
    args = parser.parse_args()

    seconds = load(args.inputs)
    if not seconds:
        raise SystemExit("no data in " + ", ".join(args.inputs))
    start, end = min(seconds), max(seconds)
    versions = sorted({v for b in seconds.values() for v in b["ok"]})
    peak = max(max([*b["ok"].values(), b["failed"], 1]) for b in seconds.values())
    top = max(10, ((peak + 9) // 10) * 10)

    width, height, left, right, upper, lower = 960, 420, 56, 150, 40, 48
    plot_w, plot_h = width - left - right, height - upper - lower

    def x(at):
        return left + (at - start) / max(end - start, 1) * plot_w

    def y(value):
        return upper + plot_h - value / top * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="22" font-size="15">{escape(args.title)}</text>',
    ]
    for i in range(0, 6):
        value = top * i / 5
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:g}</text>')
    step = max(1, (end - start) // 10)
    for at in range(start, end + 1, step):
        out.append(f'<text x="{x(at):.1f}" y="{upper + plot_h + 16}" text-anchor="middle">{at - start}s</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">seconds</text>')

    for at, phase in phases(args.phases):
        if start <= at <= end:
            out.append(
                f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{upper}" y2="{upper + plot_h}" stroke="#999" stroke-dasharray="4 3"/>'
            )
            out.append(
                f'<text x="{x(at) + 3:.1f}" y="{upper + 10}" font-size="10" fill="#555" transform="rotate(90 {x(at) + 3:.1f} {upper + 10})">{escape(phase)}</text>'
            )

    series = [(v, PALETTE[i % len(PALETTE)], lambda b, v=v: b["ok"].get(v, 0)) for i, v in enumerate(versions)]
    series.append(("failed", FAILED, lambda b: b["failed"]))
    for n, (name, colour, value) in enumerate(series):
        # Seconds without data (between two loads) break the line rather than drop it to zero.
        runs, run = [], []
        for at in range(start, end + 1):
            if at in seconds:
                run.append(f"{x(at):.1f},{y(value(seconds[at])):.1f}")
            elif run:
                runs.append(run)
                run = []
        runs.append(run)
        for points in filter(None, runs):
            out.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        total = sum(value(b) for b in seconds.values())
        ly = upper + 14 + n * 20
        out.append(f'<line x1="{left + plot_w + 14}" x2="{left + plot_w + 34}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{left + plot_w + 40}" y="{ly}">{escape(name or "unversioned")} ({total})</text>')
    out.append("</svg>")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
