#!/usr/bin/env python3
"""Draws the throughput rows of a `bench` report (docs/benchmarks.md) as a PNG chart.

Usage: bench-chart.py REPORT.md OUT.png

Every row whose value is a rate ("12345/s") becomes a bar, on a logarithmic scale because
the rates span two orders of magnitude; tidelink's own rows are coloured apart from the
native replication and ceiling rows they are compared with.
"""
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


KEPT_MARKER = "<!-- Everything below this line is kept when `bench` rewrites this report. -->"


def rates(report: str):
    rows = []
    for line in report.splitlines():
        # Cells are separated by `|`; a `\|` inside a label is part of the label.
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) < 2:
            continue
        match = re.fullmatch(r"(\d+)/s", cells[1])
        if match:
            rows.append((cells[0].replace("\\|", "|"), int(match.group(1))))
    return rows


def main() -> None:
    report_path, out_path = sys.argv[1], sys.argv[2]
    with open(report_path, encoding="utf-8") as f:
        # Only this run's table: what stands below bench's marker is kept from earlier runs.
        report = f.read().split(KEPT_MARKER)[0]
    rows = rates(report)
    if not rows:
        sys.exit(f"{report_path}: no rows with a rate (N/s) to draw")
    labels = [label for label, _ in rows][::-1]
    values = [value for _, value in rows][::-1]
    colours = [
        "#1f77b4" if ("tidelink" in label or "--direct" in label) else "#b0b0b0"
        for label in labels
    ]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    bars = ax.barh(labels, values, color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("changes or rows per second (log scale)")
    ax.set_title("tidelink benchmarks (blue: tidelink; grey: native replication and ceilings)")
    for bar, value in zip(bars, values):
        ax.text(
            bar.get_width() * 1.05,
            bar.get_y() + bar.get_height() / 2,
            f"{value:,}/s",
            va="center",
            fontsize=8,
        )
    ax.set_xlim(right=max(values) * 4)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    print(f"chart written to {out_path}")


if __name__ == "__main__":
    main()
