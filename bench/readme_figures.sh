#!/usr/bin/env bash
# Regenerates the README's benchmark figures with the package's own harness:
#   bench/results/bench.json   the full report (schema: pyloader._bench.report)
#   bench/results/bench.txt    the terminal table, with the machine it ran on
#   bench/results/bench.md     the Markdown table pasted into the README
#   bench/results/bench.png    the bar chart of batches/s by workload and loader
#
# Usage: bench/readme_figures.sh [extra `python -m pyloader bench` options, e.g. --quick]
# Environment: PYTHON (default: python), WORKERS (default: 4), REPEATS (default: 5; epochs per
# measurement, reported as medians: small shared machines are noisy).
# Run it after `pip install '.[bench,torch,keras]'`; it runs from a temporary directory so that
# the source tree (which has no compiled extension) never shadows the installed package.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/bench/results"
mkdir -p "$out"
python=${PYTHON:-python}
export KERAS_BACKEND=${KERAS_BACKEND:-torch}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
"$python" -m pyloader bench --workers "${WORKERS:-4}" --repeats "${REPEATS:-5}" \
    --json "$out/bench.json" --plot "$out/bench.png" --markdown "$out/bench.md" "$@" \
    | tee "$out/bench.txt"
