"""Progress reporting: the pure formatter, throttled log lines and reporter selection."""

from __future__ import annotations

import io
import logging

import pytest

from tenantstore.migrate.progress import (
    LogProgress,
    TqdmProgress,
    format_progress,
    make_progress,
)


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tenantstore"]


# -- format_progress ---------------------------------------------------------------


def test_format_progress_shows_counts_percent_rate_and_eta() -> None:
    line = format_progress("encrypt", 120000, 1000000, 120000 / 85000)
    assert line == "encrypt: 120000/1000000 rows (12.0%), 85000 rows/s, ETA 10s"


def test_format_progress_when_done_has_zero_eta() -> None:
    assert (
        format_progress("rotate", 50, 50, 2.0) == "rotate: 50/50 rows (100.0%), 25 rows/s, ETA 0s"
    )


def test_format_progress_without_elapsed_time_has_no_rate_or_eta() -> None:
    assert format_progress("verify", 0, 10, 0.0) == "verify: 0/10 rows (0.0%), 0 rows/s, ETA ?"


def test_format_progress_of_an_empty_table_is_complete() -> None:
    assert format_progress("decrypt", 0, 0, 1.0) == "decrypt: 0/0 rows (100.0%), 0 rows/s, ETA ?"


def test_format_progress_beyond_the_total_has_unknown_eta() -> None:
    """Rows added during a run can push done past the initial count."""
    assert format_progress("encrypt", 12, 10, 1.0).endswith("(120.0%), 12 rows/s, ETA ?")


# -- LogProgress -------------------------------------------------------------------


def test_log_progress_logs_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore")
    clock = FakeClock()
    progress = LogProgress("encrypt", interval=5.0, clock=clock)

    clock.advance(1.0)
    progress(10, 100)
    clock.advance(3.9)
    progress(20, 100)
    assert progress_lines(caplog) == []

    clock.advance(0.1)  # 5.0 s since start
    progress(30, 100)
    assert progress_lines(caplog) == ["encrypt: 30/100 rows (30.0%), 6 rows/s, ETA 12s"]

    clock.advance(4.0)
    progress(40, 100)
    assert len(progress_lines(caplog)) == 1

    clock.advance(1.0)  # 5.0 s since the last line
    progress(50, 100)
    assert progress_lines(caplog)[-1] == "encrypt: 50/100 rows (50.0%), 5 rows/s, ETA 10s"
    assert len(progress_lines(caplog)) == 2


def test_log_progress_logs_once_per_call_after_a_long_gap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore")
    clock = FakeClock()
    progress = LogProgress("rotate", interval=5.0, clock=clock)
    clock.advance(60.0)
    progress(1, 2)
    progress(2, 2)
    assert len(progress_lines(caplog)) == 1


def test_log_progress_close_logs_the_final_state_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore")
    clock = FakeClock()
    progress = LogProgress("decrypt", interval=5.0, clock=clock)
    clock.advance(1.0)
    progress(40, 100)
    clock.advance(1.0)
    progress(100, 100)
    assert progress_lines(caplog) == []
    progress.close()
    assert progress_lines(caplog) == ["decrypt: 100/100 rows (100.0%), 50 rows/s, ETA 0s"]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_log_progress_close_without_any_batch_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore")
    LogProgress("verify", clock=FakeClock()).close()
    assert progress_lines(caplog) == []


# -- make_progress -------------------------------------------------------------------


def test_make_progress_logs_when_the_stream_is_not_a_terminal() -> None:
    reporter = make_progress("encrypt", stream=io.StringIO())
    assert isinstance(reporter, LogProgress)
    assert reporter.label == "encrypt"


def test_make_progress_draws_a_bar_on_a_terminal() -> None:
    stream = TtyStream()
    reporter = make_progress("encrypt", stream=stream)
    try:
        assert isinstance(reporter, TqdmProgress)
    finally:
        reporter.close()


def test_make_progress_none_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tenantstore")
    stream = TtyStream()
    reporter = make_progress("encrypt", "none", stream=stream)
    assert not isinstance(reporter, LogProgress | TqdmProgress)
    reporter(5, 10)
    reporter.close()
    assert stream.getvalue() == ""
    assert progress_lines(caplog) == []


@pytest.mark.parametrize(("mode", "kind"), [("log", LogProgress), ("bar", TqdmProgress)])
def test_make_progress_explicit_mode_overrides_the_stream(mode: str, kind: type) -> None:
    stream = TtyStream() if mode == "log" else io.StringIO()
    reporter = make_progress("x", mode, stream=stream)  # type: ignore[arg-type]
    try:
        assert isinstance(reporter, kind)
    finally:
        reporter.close()


# -- TqdmProgress --------------------------------------------------------------------


def test_tqdm_progress_writes_to_the_given_stream() -> None:
    stream = io.StringIO()
    bar = TqdmProgress("encrypt", file=stream)
    bar(30, 100)
    bar(100, 100)
    shown = bar.bar
    assert shown is not None and shown.n == 100 and shown.total == 100
    bar.close()
    output = stream.getvalue()
    assert "encrypt" in output
    assert "100%" in output


def test_tqdm_bar_is_drawn_from_the_first_call_with_its_total() -> None:
    """Never a bar without a total: nothing is drawn before the runner has counted."""
    stream = io.StringIO()
    bar = TqdmProgress("encrypt", file=stream)
    assert stream.getvalue() == "" and bar.bar is None
    bar(0, 500)
    assert "0/500" in stream.getvalue()
    bar.close()


def test_tqdm_progress_follows_a_changing_total() -> None:
    stream = io.StringIO()
    bar = TqdmProgress("rotate", file=stream)
    bar(10, 50)
    bar(60, 80)
    assert (bar.bar.n, bar.bar.total) == (60, 80)
    bar.close()
    assert "75%" in stream.getvalue()
