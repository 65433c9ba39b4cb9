"""Re-render a saved bench report: ``python bench/render.py bench/results/bench.json``.

Prints the terminal table and the Markdown table, and rewrites the plot next to the JSON
(``bench.png``), without measuring anything again (e.g. after changing the plot's style).
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
    print(format_machine(doc["machine"]))
    print()
    print(format_table(doc))
    print()
    print(format_markdown(doc))
    target = args.plot or os.path.splitext(args.report)[0] + ".png"
    plot(doc, target)
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
