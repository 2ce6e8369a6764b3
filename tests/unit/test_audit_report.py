"""audit.Report: a damaged log or table can give a problem per row; the messages kept are bounded, the count is not."""

from __future__ import annotations

from ca_daemon.audit import Report


def test_a_problem_per_row_keeps_the_first_messages_and_counts_the_rest() -> None:
    report = Report()
    for row in range(1500):
        report.fail(None, f"row {row} differs")
    assert not report.ok
    assert len(report.problems) == 1000 and report.problems[0] == "row 0 differs" and report.more_problems == 500
    assert report.summary() == "FAILED: row 0 differs (+1499 more problem(s))"


def test_only_a_finding_in_the_log_names_a_first_bad_event() -> None:
    tables = Report()
    tables.fail(None, "a revocations row differs from its event")
    assert tables.summary() == "FAILED: a revocations row differs from its event"
    log = Report()
    log.fail(7, "event 7 differs")
    log.fail(3, "event 3 differs")
    assert log.summary() == "FAILED: first bad event: seq 7; event 7 differs (+1 more problem(s))"


def test_a_message_quoting_what_an_attacker_wrote_is_one_printable_bounded_line() -> None:
    report = Report()
    report.fail(None, "the end record says up to seq " + "\ud800\n" + "9" * 100_000)
    message = report.problems[0]
    assert message.startswith("the end record says up to seq \\ud800\\x0a999") and message.endswith("…(truncated)")
    assert len(message.encode()) <= 2048 and "\n" not in message
    print(report.summary())  # printable: a lone surrogate raised UnicodeEncodeError here
