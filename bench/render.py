"""Re-render a saved bench report: ``python bench/render.py bench/results/bench.json``.

Rewrites the terminal table, the Markdown table and the plot next to the JSON (``bench.txt``,
``bench.md``, ``bench.png``) without measuring anything again (e.g. after changing their style),
and prints the terminal table.
"""

from __future__ import annotations

import argparse
import json
import os

from pyloader._bench.machine import format_machine
from pyloader._bench.report import format_markdown, format_table, plot, validate


def main() -> int:
    """Render the report named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="a JSON file written by `python -m pyloader bench --json`")
    parser.add_argument("--plot", help="image to write (default: <report>.png)")
    args = parser.parse_args()
    with open(args.report, encoding="utf-8") as f:
        doc = json.load(f)
    validate(doc)
    stem = os.path.splitext(args.report)[0]
    text = format_machine(doc["machine"]) + "\n\n" + format_table(doc)
    with open(stem + ".txt", "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(format_markdown(doc) + "\n")
    target = args.plot or stem + ".png"
    plot(doc, target)
    print(text)
    print(f"\nwrote {stem}.txt, {stem}.md, {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
