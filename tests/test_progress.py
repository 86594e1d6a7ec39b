"""Progress: a tqdm bar where asked (or on a terminal), nothing drawn otherwise."""

import io

import pytest

from softpatch_jax import progress


@pytest.mark.parametrize(
    "value,want", [("0", "off"), ("off", "off"), ("1", "bar"), ("bar", "bar"), ("", "log")]
)
def test_mode_reads_the_environment(monkeypatch, value, want):
    monkeypatch.setenv("SOFTPATCH_PROGRESS", value)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert progress.mode() == want


def test_bar_draws_only_when_asked(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setenv("SOFTPATCH_PROGRESS", "")
    with progress.bar("stage", 10) as update:
        assert update is None  # callers skip their host round trips
    assert err.getvalue() == ""
    monkeypatch.setenv("SOFTPATCH_PROGRESS", "1")
    with progress.bar("stage", 10, "picks") as update:
        update(4)
        update(6)
    assert "stage" in err.getvalue() and "10/10" in err.getvalue()
