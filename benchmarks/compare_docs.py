"""Copies a `hfquant compare` report into docs/benchmarks.md (section compare-figure).

    python benchmarks/compare_docs.py report-compare [--note "text added under the title"]

Headings move down two levels; the plot links are left out (the PNGs stay in the report
folder, the command rewrites them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_doc_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    lines, skip = [], False
    for line in (Path(a.report_dir) / "report.md").read_text().splitlines():
        if line.startswith("#"):
            skip = line.strip() == "## Plots"
            if not skip:
                line = "##" + line
                if line.strip() == "### hfquant compare":
                    line = "### End to end: hfquant compare (configs and peers)"
                    lines.append(line)
                    if a.note:
                        lines += ["", a.note]
                    continue
        if not skip:
            lines.append(line)
    write_doc_section(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md", "compare-figure",
                      "\n".join(lines), "# Benchmarks")


if __name__ == "__main__":
    main()
