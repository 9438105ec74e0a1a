"""bench/soak's own arithmetic: reading a process's RSS, and which samples it reports."""

from __future__ import annotations

import os
from pathlib import Path

from bench.soak import Counts, Sample, _at, rss_bytes


def test_rss_is_this_process_resident_set_in_bytes() -> None:
    status = Path(f"/proc/{os.getpid()}/status").read_text().splitlines()
    vm_rss_kb = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
    got = rss_bytes(os.getpid())
    assert abs(got - vm_rss_kb * 1024) < 16 * 1024 * 1024  # the same figure, read twice


def test_the_reported_sample_is_the_first_taken_after_that_many_commands() -> None:
    samples = [
        Sample(t, n, {"api": n}) for t, n in ((0, 0), (5, 40_000), (10, 100_500), (15, 200_000))
    ]
    assert _at(samples, 100_000) is samples[2]
    assert _at(samples, 0) is samples[0]
    assert _at(samples, 300_000) is None


def test_only_http_rejections_and_202s_count_as_such() -> None:
    c = Counts()
    for status in (200, 201, 202, 409, 422):
        c.answered(status)
    assert (c.pending, c.rejected) == (1, 2)
    c.heartbeats, c.submits, c.starts, c.completes = 10, 3, 3, 2
    assert c.total == 18
