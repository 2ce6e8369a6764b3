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


def test_a_record_time_reads_as_strptime_reads_it_values_and_errors_alike() -> None:
    """verify reads the writer's own time form without strptime (a quarter of its cost): the same value, and any other
    spelling, or a value no datetime holds, as strptime reads or refuses it."""
    import random
    from datetime import UTC, datetime, timedelta

    from ca_daemon.audit import _parse_time
    from ca_daemon.audit_hash import canonical_time

    def strptime(text: object) -> datetime:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)  # type: ignore[arg-type]

    rng = random.Random(7)
    written = [canonical_time(datetime(1000, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(2**57))) for _ in range(2000)]
    odd: list[object] = [
        "2026-02-30T00:00:00.000000Z",
        "2026-13-01T00:00:00.000000Z",
        "2026-01-01T24:00:00.000000Z",
        "2026-01-01T23:59:60.000000Z",
    ]
    odd += ["0000-01-01T00:00:00.000000Z", "0999-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.5Z", "2026-1-1T0:0:0.000000Z"]
    odd += ["2026-01-01 00:00:00.000000Z", "2026-01-01T00:00:00.000000", "2026-01-01T00:00:00.000000+00:00", "", "yesterday", 5, None]
    odd += ["٢٠٢٦-01-01T00:00:00.000000Z"]  # Arabic-Indic digits: strptime's \d reads them
    for text in [*written, *odd]:
        try:
            expected: object = strptime(text)
        except (ValueError, TypeError) as exc:
            expected = (type(exc), str(exc))
        try:
            got: object = _parse_time(text)
        except (ValueError, TypeError) as exc:
            got = (type(exc), str(exc))
        assert got == expected, text
