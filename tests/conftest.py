"""Shared fixtures. Tests import the *installed* pyloader (its native extension is built by pip)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import pyloader

if not os.path.exists(os.path.join(os.path.dirname(pyloader.__file__), "_C.pyi")) or not any(
    name.startswith("_C") and name.endswith(".so") for name in os.listdir(os.path.dirname(pyloader.__file__))
):
    raise pytest.UsageError(
        f"pyloader at {pyloader.__file__} has no built extension: install it first, with "
        "`pip install '.[test]'` (the source tree in src/ is never imported by the tests)"
    )


@pytest.fixture(autouse=True)
def _torch_reference_joins_its_workers_briefly():
    """torch's DataLoader (the reference the torch tests compare with) joins each worker process
    for up to ``MP_STATUS_CHECK_INTERVAL``, 5 s, when an iterator that raised is collected: a
    failed pass of torch's loader cost the suite 10 s (two workers). Only that join reads the
    value at run time (torch's workers took their copy at import), so what torch delivers does
    not change. Set only where a test module imported torch: the runs without torch stay so."""
    utils = sys.modules.get("torch.utils.data._utils")
    if utils is not None:
        utils.MP_STATUS_CHECK_INTERVAL = 0.5
    yield


def run_python(code: str, *, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; a hang fails the calling test instead of the suite.

    It runs in tests/, where `sequences` lives.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )


@pytest.fixture
def python_subprocess():
    return run_python
