"""The ``python -m pyloader`` command line: argument errors, ``bench --quick`` end to end and its
``--json`` schema, a missing peer skipped with a note, and ``profile`` on a sample Sequence.

Nothing here asserts speed. Runs of the CLI go through a subprocess with a timeout (a hang fails
one test) whose working directory is a temporary one, so the source tree never shadows the
installed package.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

import pytest

import pyloader
from pyloader._bench.report import SCHEMA_ID, format_markdown, format_table, validate
from pyloader._cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "_sample_sequences.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pyloader.__file__)))


def run_cli(args: list[str], cwd: str, *, extra_path: str | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -m pyloader ARGS`` in a fresh interpreter that imports this test's pyloader."""
    env = dict(os.environ)
    paths = [p for p in (extra_path, PACKAGE_ROOT, env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("KERAS_BACKEND", "torch")
    return subprocess.run([sys.executable, "-m", "pyloader", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def usage_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


# -- argument parsing ---------------------------------------------------------------------------


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "COMMAND" in usage_error(capsys, [])


def test_unknown_workload_is_named_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, ["bench", "--workload", "tiny,nope"])
    assert "'nope'" in err and "gather" in err


def test_unknown_loader_is_named_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, ["bench", "--loaders", "plain", "--loaders", "jax"])
    assert "'jax'" in err and "keras-threads" in err


@pytest.mark.parametrize("value, shown", [("0", "0"), ("2,x", "'2,x'"), ("-1", "-1")])
def test_bad_workers_show_the_value(capsys: pytest.CaptureFixture[str], value: str,
                                    shown: str) -> None:
    err = usage_error(capsys, ["bench", "--workers", value])
    assert "--workers" in err and shown in err


@pytest.mark.parametrize("option, value", [("--repeats", "0"), ("--repeats", "many"),
                                           ("--step-ms", "-5"), ("--timeout", "soon")])
def test_bad_numbers_show_the_value(capsys: pytest.CaptureFixture[str], option: str,
                                    value: str) -> None:
    err = usage_error(capsys, ["bench", option, value])
    assert option in err and value in err


def test_profile_target_needs_a_colon(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, ["profile", "just_a_module"])
    assert "MODULE:FACTORY" in err and "'just_a_module'" in err


def test_profile_target_must_give_a_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, ["profile", f"{SAMPLES}:make_not_a_sequence"])
    assert "not a Sequence" in err


def test_bench_without_psutil_names_the_extra(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if not installed: import raises
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs psutil" in err and "pyloader[bench]" in err


def test_list_names_every_workload_and_loader(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("latency", "tiny", "gather", "python", "decode", "plain", "pyloader", "torch",
                 "keras-threads", "keras-processes"):
        assert name in out


# -- the report schema --------------------------------------------------------------------------


def test_validate_lists_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="missing key 'results'"):
        validate({"schema": SCHEMA_ID})
    with pytest.raises(ValueError, match="invalid bench report"):
        validate([])


# -- bench --quick end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick bench of two workloads through plain, pyloader (both modes) and torch."""
    tmp = tmp_path_factory.mktemp("bench")
    proc = run_cli(["bench", "--quick", "--workload", "tiny", "--workload", "latency",
                    "--loaders", "plain,pyloader,pyloader-process,torch", "--workers", "2",
                    "--json", "out.json", "--plot", "out.png", "--markdown", "out.md"], str(tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp / "out.json", encoding="utf-8") as f:
        doc = json.load(f)
    return {"proc": proc, "doc": doc, "dir": tmp}


def test_quick_json_follows_the_schema(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    validate(doc)
    assert doc["config"]["quick"] is True
    assert doc["config"]["workloads"] == ["tiny", "latency"]
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["machine"]["versions"]["numpy"]


def test_quick_measures_every_planned_pair(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    pairs = {(r["workload"], r["loader"]) for r in doc["results"]}
    assert pairs == {(w, loader) for w in ("tiny", "latency")
                     for loader in ("plain", "pyloader", "pyloader-process", "torch")}
    by = {(r["workload"], r["loader"]): r for r in doc["results"]}
    for workload in ("tiny", "latency"):
        plain, loader = by[(workload, "plain")], by[(workload, "pyloader")]
        assert plain["status"] == "ok" and plain["workers"] is None
        assert loader["status"] == "ok" and loader["workers"] == 2
        assert loader["batches"] == plain["batches"] > 0
        assert loader["ratios"]["plain"] > 0
        assert loader["engine_stall_fraction"] is not None
        assert loader["memory"]["peak_mb"] >= loader["memory"]["base_mb"] > 0


def test_process_mode_is_measured(quick_run: dict[str, Any]) -> None:
    rows = [r for r in quick_run["doc"]["results"] if r["loader"] == "pyloader-process"]
    assert rows and all(row["status"] == "ok" for row in rows), rows


def test_quick_prints_machine_and_table_and_writes_files(quick_run: dict[str, Any]) -> None:
    out = quick_run["proc"].stdout
    assert out.startswith("machine: ")
    assert "batches/s" in out and "vs plain" in out
    assert out.count("latency ") >= 4
    with open(quick_run["dir"] / "out.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(quick_run["dir"] / "out.md", encoding="utf-8") as f:
        assert f.readline().startswith("| workload | loader |")


def test_output_that_is_no_terminal_gets_a_line_up_front_and_one_per_row(
        quick_run: dict[str, Any]) -> None:
    lines = quick_run["proc"].stderr.splitlines()
    rows = len(quick_run["doc"]["results"])
    up_front = [line for line in lines if line.startswith("bench: ")]
    assert up_front and up_front[0].startswith(f"bench: {rows} rows x 1 round(s)") and "roughly" in up_front[0]
    progress = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == [f"[{k}/{rows}" for k in range(1, rows + 1)]
    assert all("batches/s" in line and "left)" in line for line in progress), progress
    assert lines.index(up_front[0]) < lines.index(progress[0])


def test_tables_render_from_the_json(quick_run: dict[str, Any]) -> None:
    doc = quick_run["doc"]
    assert "pyloader" in format_table(doc)
    assert format_markdown(doc).count("\n") == len(doc["results"]) + 1


def test_streamed_workloads_run_through_stream_loaders_and_torch_only(tmp_path: Any) -> None:
    proc = run_cli(["bench", "--quick", "-w", "stream-tiny,tiny", "-l", "pyloader,pyloader-stream,torch",
                    "--workers", "2", "--json", "out.json", "--no-progress"], str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    validate(doc)
    ran = {(r["workload"], r["loader"]) for r in doc["results"] if r["status"] == "ok"}
    assert ran == {("stream-tiny", "pyloader-stream"), ("stream-tiny", "torch"), ("tiny", "pyloader"),
                   ("tiny", "torch")}, doc["results"]


def test_a_missing_peer_is_skipped_with_a_note(tmp_path: Any) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['keras'] = None\n")
    proc = run_cli(["bench", "--quick", "-w", "tiny", "-l", "plain,keras-threads",
                    "--json", "out.json", "--no-progress"], str(tmp_path), extra_path=str(blocker))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    validate(doc)
    by = {r["loader"]: r for r in doc["results"]}
    assert by["plain"]["status"] == "ok"
    assert by["keras-threads"]["status"] == "unavailable"
    assert "keras" in by["keras-threads"]["note"]
    assert any("keras-threads: skipped" in n for n in doc["notes"])
    assert "keras-threads: skipped" in proc.stdout


# -- profile ------------------------------------------------------------------------------------


def test_profile_recommends_settings_for_the_sample(tmp_path: Any) -> None:
    proc = run_cli(["profile", f"{SAMPLES}:make_sleepy", "--workers", "1,2", "--batches", "8",
                    "--step-ms", "1", "--json", "profile.json"], str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for heading in ("1. load time", "2. thread-mode throughput", "3. recommendation",
                    "4. consumer stall", "5. autotune"):
        assert heading in out
    result = json.loads((tmp_path / "profile.json").read_text())
    rec = result["recommendation"]
    assert rec["mode"] in ("thread", "process")
    assert rec["workers"] in (1, 2)
    assert rec["depth"] >= 1
    assert rec["reasons"] and all(isinstance(r, str) for r in rec["reasons"])
    assert [s["workers"] for s in result["scaling"]] == [1, 2]
    assert result["load"]["batches"] == 8
    # The sample sleeps (releases the GIL), but the GIL share is estimated from how loading scales
    # with threads, which a busy machine bends: check the rule, not a timing. Processes are
    # measured exactly when the estimate says most of the load holds the GIL.
    gil = result["gil_share"]
    measured = gil is not None and gil >= 0.5 and result["cpus"] > 1
    assert (result["process_scaling"] != []) == measured, (gil, result["process_scaling"])
    assert all(0.0 <= s["stall_fraction"] <= 1.0 for s in result["stall"])
    # Step 5 runs the Prefetcher's own tuner: the settings of each pass, and each decision shown.
    auto = result["autotune"]
    assert len(auto["passes"]) == 4
    assert all(p["mode"] in ("thread", "process") and p["workers"] >= 1 for p in auto["passes"])
    for decision in auto["decisions"]:
        assert f"   - {decision}" in out
    if not auto["decisions"]:
        assert "   - no change" in out


def test_profile_measures_process_mode_before_recommending_it(tmp_path: Any) -> None:
    proc = run_cli(["profile", f"{SAMPLES}:make_busy", "--workers", "1,2", "--batches", "16",
                    "--json", "profile.json"], str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "profile.json").read_text())
    if result["cpus"] < 2:
        pytest.skip("one CPU: no GIL share to measure, so no process mode to weigh")
    assert result["gil_share"] >= 0.5, proc.stdout
    assert "2b. process-mode throughput" in proc.stdout
    processes = result["process_scaling"]
    assert [s["workers"] for s in processes] == [1, 2]
    assert all(s["batches_per_s"] > 0 for s in processes)
    # The recommendation follows the measurement, whichever way it went on this machine.
    faster = max(s["batches_per_s"] for s in processes) > max(s["batches_per_s"] for s in result["scaling"])
    assert result["recommendation"]["mode"] == ("process" if faster else "thread")
    assert "processes measured" in " ".join(result["recommendation"]["reasons"])


def test_profile_imports_a_dotted_module_name(tmp_path: Any) -> None:
    proc = run_cli(["profile", "_sample_sequences:SleepySequence", "--workers", "1",
                    "--batches", "4"], str(tmp_path), extra_path=HERE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recommendation: Prefetcher(seq, mode=" in proc.stdout


def test_a_loader_runs_only_the_workloads_it_applies_to() -> None:
    from pyloader._bench.harness import BenchConfig, _plan

    plan = _plan(BenchConfig(workloads=("tiny", "gather"), loaders=("plain", "pyloader-array"),
                             workers=(1, 2)))
    pairs = [(p.workloads, p.loader, p.workers) for p in plan]
    assert pairs == [(("tiny",), "plain", None), (("gather",), "plain", None),
                     (("gather",), "pyloader-array", 1), (("gather",), "pyloader-array", 2)]


def test_bench_config_rejects_bad_values_showing_them() -> None:
    from pyloader._bench.harness import BenchConfig

    with pytest.raises(ValueError, match="'nope'"):
        BenchConfig(workloads=("nope",), loaders=("plain",))
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        BenchConfig(workloads=("tiny",), loaders=("plain",), repeats=0)


def test_rounds_pool_every_rounds_epochs_in_alternating_order(tmp_path: Any) -> None:
    """--rounds 2 runs the plan twice, and each row holds the epochs of both rounds, tagged with
    their round."""
    proc = run_cli(["bench", "--quick", "--workload", "tiny", "--loaders", "plain,pyloader",
                    "--workers", "2", "--repeats", "2", "--rounds", "2", "--json", "out.json"],
                   str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "out.json", encoding="utf-8") as f:
        doc = json.load(f)
    validate(doc)
    assert doc["config"]["rounds"] == 2
    for row in doc["results"]:
        assert row["status"] == "ok", row
        assert [e["round"] for e in row["epochs"]] == [0, 0, 1, 1], row["epochs"]
        assert row["batches_per_s"] > 0 and row["memory"]["peak_mb"] > 0
    assert "in 2 rounds of the whole run" in proc.stdout
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        from pyloader._bench.harness import BenchConfig

        BenchConfig(workloads=("tiny",), loaders=("plain",), rounds=0)


def test_rounds_alternate_the_order_and_stop_measuring_what_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of the subprocesses, recorded in place of running them (the run itself is
    covered above): the plan, then reversed, then the plan; a measurement that failed in round 1
    is not run again, and its row is the failure."""
    from pyloader._bench import harness

    ran = []

    def fake_run(request: dict[str, Any], config: Any, done: Any) -> None:
        (workload,) = request["workloads"]
        ran.append((workload, request["loader"]))
        if (workload, request["loader"]) == ("latency", "plain"):
            done(workload, {"event": "error", "error": "boom", "stderr_tail": ""})
            return
        epochs = [{"batches": 4, "wall_s": 1.0, "first_batch_s": 0.1, "wait_s": 1.0, "stall_fraction": 1.0}]
        done(workload, {"event": "result", "epochs": epochs, "startup_s": 0.0, "close_s": 0.0, "memory": None})

    monkeypatch.setattr(harness, "_run_subprocess", fake_run)
    config = harness.BenchConfig(workloads=("tiny", "latency"), loaders=("plain", "pyloader"), rounds=3)
    doc = harness.run_bench(config, progress=False)
    one = [("tiny", "plain"), ("tiny", "pyloader"), ("latency", "plain"), ("latency", "pyloader")]
    again = [pair for pair in one if pair != ("latency", "plain")]
    assert ran == one + again[::-1] + again, ran
    rows = {(r["workload"], r["loader"]): r for r in doc["results"]}
    assert rows[("latency", "plain")]["status"] == "error"
    assert len(rows[("tiny", "pyloader")]["epochs"]) == 3


def test_pooled_rounds_take_medians_and_the_peak_round_and_a_failure_decides() -> None:
    from pyloader._bench.harness import _summarize

    def result(walls: list[float], startup: float, peak: float) -> dict[str, Any]:
        epochs = [{"batches": 10, "wall_s": w, "first_batch_s": 0.01, "wait_s": w, "stall_fraction": 1.0}
                  for w in walls]
        return {"event": "result", "epochs": epochs, "startup_s": startup, "close_s": 0.0,
                "memory": {"metric": "pss", "base_mb": 100.0, "peak_mb": peak, "peak_rss_mb": peak,
                           "peak_processes": 1},
                "self_rss_hwm_mb": peak, "children_rss_hwm_mb": 0.0}

    row = _summarize("tiny", "plain", None, [result([1.0, 2.0], 0.5, 120.0), result([4.0, 5.0], 0.1, 150.0)])
    assert row["status"] == "ok"
    assert row["batches_per_s"] == pytest.approx(statistics.median([10, 5, 2.5, 2]))
    assert row["cold_first_batch_s"] == pytest.approx(statistics.median([0.51, 0.11]))
    assert row["memory"]["peak_mb"] == 150.0 and row["self_rss_hwm_mb"] == 150.0
    failed = {"event": "error", "error": "killed", "stderr_tail": ""}
    row = _summarize("tiny", "plain", None, [result([1.0], 0.5, 120.0), failed])
    assert row["status"] == "error" and row["note"] == "killed"


def test_memory_sampler_backs_off_when_sampling_is_slow() -> None:
    """A sample that took 10 ms waits at least 20x that before the next one (the sampler shares
    the CPUs with what it measures); a fast one keeps the configured period as a floor."""
    import time

    from pyloader._bench.harness import SAMPLER_DUTY, BenchConfig, _next_sample

    config = BenchConfig(workloads=("tiny",), loaders=("plain",), sample_interval_s=0.05)
    started = time.monotonic() - 0.010
    assert _next_sample(started, config) >= started + SAMPLER_DUTY * 0.010
    started = time.monotonic()
    assert _next_sample(started, config) >= started + 0.05


# -- model.fit loaders --------------------------------------------------------------------------


def test_fit_loaders_are_opt_in_and_run_only_latency_and_gather() -> None:
    from pyloader._bench.harness import BenchConfig, _plan
    from pyloader._bench.loaders import default_loaders

    fit = ("fit-keras-threads", "fit-keras-processes", "fit-pyloader")
    assert not set(fit) & set(default_loaders())
    plan = _plan(BenchConfig(workloads=("tiny", "latency", "gather", "python"), loaders=fit))
    assert {(p.workloads, p.loader) for p in plan} == {
        ((w,), loader) for w in ("latency", "gather") for loader in fit}


def test_quick_fit_run_compares_fit_loaders_only_with_each_other(tmp_path: Any) -> None:
    proc = run_cli(["bench", "--quick", "-w", "latency", "-l",
                    "plain,fit-pyloader,fit-keras-threads",
                    "--workers", "2", "--json", "out.json", "--no-progress"], str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    validate(doc)
    by = {r["loader"]: r for r in doc["results"]}
    assert by["fit-pyloader"]["status"] == by["fit-keras-threads"]["status"] == "ok", doc["notes"]
    for name in ("fit-pyloader", "fit-keras-threads"):
        assert by[name]["batches"] == by["plain"]["batches"] > 0  # every batch went through fit
    assert set(by["fit-pyloader"]["ratios"]) == {"fit-keras-threads"}
    assert by["fit-pyloader"]["engine_stall_fraction"] is not None
    assert by["fit-keras-threads"]["ratios"] == {"fit-keras-threads": 1.0}
    assert set(by["plain"]["ratios"]) == {"plain"}
    assert "vs fit-keras-threads" in proc.stdout
