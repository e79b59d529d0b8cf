"""The two tiers: `make test-fast` runs the tests not marked `slow`, so a test that starts a process
(Ray, a storage server, a browser, `scriptorium` itself) carries the mark, or it fails, saying so.

tests/conftest.py refuses every process start in a test without the mark, but the render sandbox's
child: every rendered page goes through one (pipeline/render/sandbox.py), started once per thread.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from scriptorium.pipeline.render.sandbox import RenderSandbox


@pytest.mark.xfail(raises=pytest.fail.Exception, strict=True, reason="it starts a process and is not marked slow")
def test_a_test_not_marked_slow_fails_when_it_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"])


@pytest.mark.slow
def test_a_test_marked_slow_starts_what_it_needs():
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_the_renderer_is_started_by_any_test():
    sandbox = RenderSandbox()
    try:
        sandbox.ensure_started()
        assert sandbox.pid is not None
    finally:
        sandbox.stop()
