"""Render and check benchmark reports: the terminal table, Markdown, the JSON schema, the plot.

The report document (what ``--json FILE`` writes) is one JSON object::

    {
      "schema": "pyloader.bench/1",     # SCHEMA_ID; bumped on incompatible changes
      "created": "2025-01-01T12:00:00+00:00",
      "duration_s": 123.4,              # wall time of the whole run
      "command": ["...", "bench", ...], # sys.argv of the run
      "machine": {                      # machine.machine_info()
        "cpu_count": 2, "cpu_affinity": 2, "cpu_model": "...", "memory_bytes": ...,
        "platform": "...", "python": "CPython 3.11.9", "executable": "...",
        "versions": {"pyloader": "0.1.0" | null, "numpy": "...", "torch": ..., "keras": ...,
                     "pillow": ..., "psutil": ...},
        "load_average": [1.2, 0.9, 0.7] | null   # os.getloadavg() when the run started
      },
      "config": {"workloads": [...], "loaders": [...], "workers": [4], "repeats": 3,
                 "rounds": 1,                  # absent in documents from before --rounds
                 "quick": false, "step_ms": 0.0, "timeout_s": 600.0, "sample_interval_s": 0.05,
                 "group_by_loader": false},   # true with --quick: one subprocess per loader
      "workloads": {"latency": "description", ...},
      "loaders": {"pyloader": "description", ...},
      "notes": ["keras-processes: skipped, keras is not installed", ...],
      "results": [                      # one entry per workload x loader x workers, in run order
        {
          "workload": "gather", "loader": "pyloader",
          "kind": "pyloader" | "peer",
          "workers": 4 | null,          # null for loaders without workers (plain)
          "status": "ok" | "unavailable" | "error",
          "note": null | "why it was skipped / the error",
          # the rest is null (or empty) unless status == "ok"; medians over the repeats (of
          # every round; per-round figures such as startup_s: medians over the rounds):
          "batches": 1000,              # batches per epoch
          "batches_per_s": 812.5,
          "first_batch_s": 0.004,       # time from starting an epoch to its first batch
          "cold_first_batch_s": 0.02,   # opening the loader + the first batch of its first epoch
          "stall_fraction": 0.97,       # consumer time inside next() / epoch wall time
          "engine_stall_fraction": 0.95 | null,  # stats()["stall_fraction"] (pyloader only)
          "startup_s": 0.01, "close_s": 0.002,   # opening and closing the loader (once)
          "memory": {                   # process tree of the measurement, sampled after setup
                                        # (with rounds > 1: the round with the highest peak)
            "metric": "pss" | "rss", "base_mb": 520.1, "peak_mb": 561.0,
            "peak_rss_mb": 700.2, "peak_processes": 5
          } | null,
          "ratios": {"plain": 3.1, "torch": 1.4, ...},  # batches_per_s / the peer's, same
                                                         # workload and workers, peers that ran
          "epochs": [                   # one per repeat, in order, round after round
            {"batches": 1000, "wall_s": 1.23, "first_batch_s": 0.004, "wait_s": 1.19,
             "stall_fraction": 0.97, "engine_stats": {...},   # engine_stats: pyloader only
                                                      # (with "autotune": its settings, decisions)
             "round": 0}                                      # the round it ran in (from 0)
          ],
          "self_rss_hwm_mb": 600.0, "children_rss_hwm_mb": 0.0  # getrusage high-water marks
        }
      ]
    }

:func:`validate` checks a document against this schema (the tests use it on real output).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCHEMA_ID", "format_markdown", "format_table", "plot", "validate"]

SCHEMA_ID = "pyloader.bench/1"

_NUM = (int, float)
_TOP: dict[str, Any] = {
    "schema": str, "created": str, "duration_s": _NUM, "command": list, "machine": dict,
    "config": dict, "workloads": dict, "loaders": dict, "notes": list, "results": list,
}
_MACHINE = {"cpu_count": (int, type(None)), "cpu_model": str, "python": str, "platform": str,
            "versions": dict}
_CONFIG = {"workloads": list, "loaders": list, "workers": list, "repeats": int, "quick": bool,
           "step_ms": _NUM, "timeout_s": _NUM, "sample_interval_s": _NUM, "group_by_loader": bool}
_OPT_NUM = (int, float, type(None))
_RESULT = {
    "workload": str, "loader": str, "kind": str, "workers": (int, type(None)), "status": str,
    "note": (str, type(None)), "batches": (int, type(None)), "batches_per_s": _OPT_NUM,
    "first_batch_s": _OPT_NUM, "cold_first_batch_s": _OPT_NUM, "stall_fraction": _OPT_NUM,
    "engine_stall_fraction": _OPT_NUM,
    "startup_s": _OPT_NUM, "close_s": _OPT_NUM, "memory": (dict, type(None)), "ratios": dict,
    "epochs": list,
}
_MEMORY = {"metric": str, "base_mb": _NUM, "peak_mb": _NUM, "peak_rss_mb": _NUM,
           "peak_processes": int}
_EPOCH = {"batches": int, "wall_s": _NUM, "first_batch_s": _NUM, "wait_s": _NUM,
          "stall_fraction": _OPT_NUM}


def _check(obj: Any, fields: dict[str, Any], where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    for key, types in fields.items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
        elif not isinstance(obj[key], types) or (types is int and isinstance(obj[key], bool)):
            problems.append(f"{where}.{key}: unexpected type {type(obj[key]).__name__} "
                            f"(value {obj[key]!r})")


def validate(doc: Any) -> None:
    """Check that ``doc`` follows the report schema of this module.

    Args:
        doc: A parsed report document.

    Raises:
        ValueError: Listing every problem found (missing keys, wrong types, bad values).
    """
    problems: list[str] = []
    _check(doc, _TOP, "report", problems)
    if problems:
        raise ValueError("invalid bench report: " + "; ".join(problems))
    if doc["schema"] != SCHEMA_ID:
        problems.append(f"report.schema: expected {SCHEMA_ID!r}, got {doc['schema']!r}")
    _check(doc["machine"], _MACHINE, "machine", problems)
    _check(doc["config"], _CONFIG, "config", problems)
    rounds = doc["config"].get("rounds", 1) if isinstance(doc["config"], dict) else 1
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        problems.append(f"config.rounds: expected an int >= 1, got {rounds!r}")
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}]"
        _check(row, _RESULT, where, problems)
        if not isinstance(row, dict) or any(k not in row for k in _RESULT):
            continue
        if row["status"] not in ("ok", "unavailable", "error"):
            problems.append(f"{where}.status: unexpected value {row['status']!r}")
        if row["kind"] not in ("pyloader", "peer"):
            problems.append(f"{where}.kind: unexpected value {row['kind']!r}")
        if row["status"] == "ok":
            for key in ("batches", "batches_per_s", "first_batch_s", "cold_first_batch_s",
                        "startup_s"):
                if row[key] is None:
                    problems.append(f"{where}.{key}: null in an ok result")
            if not row["epochs"]:
                problems.append(f"{where}.epochs: empty in an ok result")
            for j, epoch in enumerate(row["epochs"]):
                _check(epoch, _EPOCH, f"{where}.epochs[{j}]", problems)
            if row["memory"] is not None:
                _check(row["memory"], _MEMORY, f"{where}.memory", problems)
        elif not row["note"]:
            problems.append(f"{where}.note: a {row['status']} result must say why")
        for peer, ratio in row["ratios"].items():
            if not isinstance(ratio, _NUM) or not math.isfinite(ratio) or ratio <= 0:
                problems.append(f"{where}.ratios[{peer!r}]: bad ratio {ratio!r}")
    if problems:
        raise ValueError("invalid bench report: " + "; ".join(problems))


# -- tables -------------------------------------------------------------------------------------


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _fmt_tick(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def _peers_in(doc: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for row in doc["results"]:
        if row["kind"] == "peer" and row["status"] == "ok" and row["loader"] not in seen:
            seen.append(row["loader"])
    return seen


def _rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    peers = _peers_in(doc)
    header = ["workload", "loader", "W", "batches/s", "spread", *[f"vs {p}" for p in peers],
              "1st batch ms", "cold 1st ms", "peak MB", "+MB", "stall", "stats() stall"]
    rows = []
    for row in doc["results"]:
        cells = [row["workload"], row["loader"],
                 "-" if row["workers"] is None else str(row["workers"])]
        if row["status"] != "ok":
            cells.append(row["status"] if row["status"] == "error" else "skipped")
            cells.extend([""] * (len(header) - len(cells)))
            rows.append(cells)
            continue
        cells.append(_fmt_rate(row["batches_per_s"]))
        rates = [e["batches"] / e["wall_s"] for e in row["epochs"] if e["wall_s"] > 0]
        if len(rates) > 1 and row["batches_per_s"]:
            cells.append(f"±{(max(rates) - min(rates)) / 2 / row['batches_per_s']:.0%}")
        else:
            cells.append("-")
        for peer in peers:
            ratio = row["ratios"].get(peer)
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        cells.append(_fmt_ms(row["first_batch_s"]))
        cells.append(_fmt_ms(row["cold_first_batch_s"]))
        mem = row["memory"]
        if mem:
            cells.append(f"{mem['peak_mb']:,.0f}")
            cells.append(f"{mem['peak_mb'] - mem['base_mb']:+,.0f}")
        else:
            cells.extend(["-", "-"])
        for stall in (row["stall_fraction"], row["engine_stall_fraction"]):
            cells.append("-" if stall is None else f"{stall:.0%}")
        rows.append(cells)
    return header, rows


def _legend(doc: dict[str, Any]) -> list[str]:
    mem_metric = next((r["memory"]["metric"] for r in doc["results"] if r.get("memory")), "pss")
    cfg = doc["config"]
    rounds = cfg.get("rounds", 1)
    epochs = (f"{cfg['repeats']} epoch(s) on one loader" if rounds == 1 else
              f"{rounds} x {cfg['repeats']} epochs on one loader, in {rounds} rounds of the whole "
              f"run (every other one in reverse order)")
    lines = [
        f"batches/s: median of {epochs}, spread: half their range "
        "over the median; vs X: batches/s over X's, "
        "same workload and W; 1st batch: median time from starting an epoch to its first batch, "
        "cold 1st: from opening the loader to its first batch;",
        f"peak MB: peak {mem_metric.upper()} of the measurement's process tree (with workers), "
        "+MB: over the tree after setup; stall: share of the epoch the consumer waited for data, "
        "timed by the harness around next(); stats() stall: the same as pyloader's stats() "
        "counts it"
        + (f"; consumer step {cfg['step_ms']:g} ms per batch." if cfg["step_ms"] else
           "; the consumer does no work, so stall is near 100% whenever loading is the "
           "bottleneck."),
    ]
    return lines


def format_table(doc: dict[str, Any]) -> str:
    """Render the results as a fixed-width text table with a legend and the notes.

    Args:
        doc: A report document.

    Returns:
        The text, without a trailing newline.
    """
    header, rows = _rows(doc)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 1}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for cells in rows:
        if previous is not None and cells[0] != previous:
            out.append("")
        previous = cells[0]
        out.append(line(cells))
    out.append("")
    out.extend(_legend(doc))
    out.extend(f"loader {name}: {desc}" for name, desc in doc["loaders"].items())
    out.extend(f"workload {name}: {desc}" for name, desc in doc["workloads"].items())
    if doc["notes"]:
        out.append("notes:")
        out.extend(f"  - {note}" for note in doc["notes"])
    return "\n".join(out)


def format_markdown(doc: dict[str, Any]) -> str:
    """Render the results as a GitHub Markdown table (for the README).

    Args:
        doc: A report document.

    Returns:
        The Markdown text, without a trailing newline.
    """
    header, rows = _rows(doc)
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out.extend("| " + " | ".join(c or " " for c in cells) + " |" for cells in rows)
    return "\n".join(out)


# -- plot ---------------------------------------------------------------------------------------


def plot(doc: dict[str, Any], path: str) -> None:
    """Write a bar chart of batches/s by workload and loader (one panel per workload).

    Uses matplotlib's Agg canvas directly (no pyplot, no display needed).

    Args:
        doc: A report document.
        path: Output image path; the format follows the extension (``.png``, ``.svg``, ...).

    Raises:
        ValueError: If the document holds no successful result to plot.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    if not ok:
        raise ValueError(f"nothing to plot: no successful result in {len(doc['results'])} results")
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    # Stable colors: pyloader's loaders in reds, peers in other hues, in the configured order.
    kinds = {r["loader"]: r["kind"] for r in doc["results"]}
    palettes = {"pyloader": ["#d62728", "#ff9896", "#a01818", "#e377c2"],
                "peer": ["#7f7f7f", "#1f77b4", "#2ca02c", "#98df8a", "#9467bd", "#17becf",
                         "#bcbd22", "#8c564b"]}
    colors: dict[str, str] = {}
    for name in [*doc["loaders"], *kinds]:
        if name not in colors:
            palette = palettes[kinds.get(name, "peer")]
            used = sum(1 for n in colors if kinds.get(n, "peer") == kinds.get(name, "peer"))
            colors[name] = palette[used % len(palette)]
    ncols = min(len(workloads), 3)
    nrows = math.ceil(len(workloads) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(workloads):]:
        ax.set_visible(False)
    multi_w = len(doc["config"]["workers"]) > 1
    for ax, workload in zip(axes.flat, workloads):
        rows = [r for r in ok if r["workload"] == workload]
        labels = [r["loader"] + (f" w{r['workers']}" if multi_w and r["workers"] else "")
                  for r in rows]
        values = [r["batches_per_s"] for r in rows]
        bars = ax.barh(range(len(rows)), values, color=[colors[r["loader"]] for r in rows])
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        ax.set_title(workload)
        ax.set_xlabel("batches/s (higher is better)")
        ax.bar_label(bars, labels=[_fmt_rate(v) for v in values], padding=2, fontsize=8)
        if max(values) > 30 * min(values):  # spans orders of magnitude: a log axis shows all
            ax.set_xscale("log")
            ax.set_xlim(min(values) / 2, max(values) * 6)
            ax.set_xlabel("batches/s, log scale (higher is better)")
        else:
            ax.set_xlim(0, max(values) * 1.25)
            ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_tick(v)))
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
    m = doc["machine"]
    workers = ",".join(str(w) for w in doc["config"]["workers"])
    fig.suptitle(
        f"pyloader bench: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['python']}, "
        f"workers={workers}" + (", --quick" if doc["config"]["quick"] else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
