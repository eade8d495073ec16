"""Copies a `hfquant compare` report into docs/benchmarks.md (section compare-figure).

    python benchmarks/compare_docs.py report-compare [--note "text added under the title"]

Headings move down two levels; the plots are copied to docs/img/compare/ and linked from there.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_doc_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    docs = Path(__file__).resolve().parent.parent / "docs"
    img = docs / "img" / "compare"
    lines, plots = [], False
    for line in (Path(a.report_dir) / "report.md").read_text().splitlines():
        if line.startswith("#"):
            plots = line.strip() == "## Plots"
            line = "##" + line
            if line.strip() == "### hfquant compare":
                lines.append("### End to end: hfquant compare (configs and peers)")
                if a.note:
                    lines += ["", a.note]
                continue
        if plots and line.startswith("![") and line.endswith(")"):
            name = line[line.index("(") + 1:-1]
            img.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(a.report_dir) / name, img / name)
            line = line[:line.index("(") + 1] + f"img/compare/{name})"
        lines.append(line)
    write_doc_section(docs / "benchmarks.md", "compare-figure",
                      "\n".join(lines), "# Benchmarks")


if __name__ == "__main__":
    main()
