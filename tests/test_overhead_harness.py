"""benchmarks/overhead/harness.py: wrk output parsing, /proc stat parsing, the math."""

from __future__ import annotations

import pytest

from benchmarks.overhead.harness import (
    ProcStat,
    WrkParseError,
    WrkResult,
    combine_wrk,
    cpu_us_per_request,
    group_totals,
    median,
    parse_proc_stat,
    parse_wrk,
    ratio,
    split_connections,
)

# Captured from `wrk -t2 -c32 -d4s --latency -s lua/chat.lua` against one fake engine.
WRK_OK = """Running 4s test @ http://127.0.0.1:18501/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   410.72us  503.25us   5.69ms   93.31%
    Req/Sec    49.79k     9.71k   61.30k    67.50%
  Latency Distribution
     50%  258.00us
     75%  418.00us
     90%  626.00us
     99%    3.05ms
  396386 requests in 4.01s, 153.10MB read
Requests/sec:  98914.79
Transfer/sec:     38.20MB
"""

# Captured from wrk against a path the fake engine answers with 404.
WRK_404 = """Running 1s test @ http://127.0.0.1:18502/v1/nope
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    35.53us   60.13us   1.84ms   97.95%
    Req/Sec   127.04k     5.18k  136.75k    70.00%
  Latency Distribution
     50%   26.00us
     75%   33.00us
     90%   48.00us
     99%  245.00us
  126023 requests in 1.00s, 15.62MB read
  Non-2xx or 3xx responses: 126023
Requests/sec: 125981.30
Transfer/sec:     15.62MB
"""

# Seconds-scale latencies and socket errors (wrk's own line format, src/wrk.c).
WRK_SLOW = """Running 10s test @ http://127.0.0.1:1/v1/chat/completions
  2 threads and 32 connections
  Latency Distribution
     50%    1.43s
     75%    1.50s
     90%    1.58s
     99%    1.65s
  160 requests in 10.02s, 120.00KB read
  Socket errors: connect 0, read 12, write 0, timeout 3
Requests/sec:     15.97
"""


@pytest.mark.parametrize(
    ("text", "requests", "rps", "p50", "p99", "errors"),
    [
        (WRK_OK, 396386, 98914.79, 0.258, 3.05, 0),
        (WRK_404, 126023, 125981.30, 0.026, 0.245, 126023),
        (WRK_SLOW, 160, 15.97, 1430.0, 1650.0, 15),
    ],
)
def test_parse_wrk(text: str, requests: int, rps: float, p50: float, p99: float, errors: int):
    res = parse_wrk(text)
    assert res.requests == requests
    assert res.rps == pytest.approx(rps)
    assert res.p50_ms == pytest.approx(p50)
    assert res.p99_ms == pytest.approx(p99)
    assert res.errors == errors


def test_parse_wrk_details():
    ok = parse_wrk(WRK_OK)
    assert ok.p75_ms == pytest.approx(0.418) and ok.p90_ms == pytest.approx(0.626)
    assert ok.duration_s == pytest.approx(4.01)
    slow = parse_wrk(WRK_SLOW)
    assert slow.socket_errors == {"read": 12, "timeout": 3}


def test_parse_wrk_rejects_output_without_latency():
    with pytest.raises(WrkParseError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_combine_wrk_sums_and_weights():
    a = WrkResult(100, 2.0, 50.0, 1.0, 1.0, 1.0, 2.0, non2xx=1)
    b = WrkResult(300, 2.1, 150.0, 3.0, 3.0, 3.0, 6.0, socket_errors={"read": 2})
    both = combine_wrk([a, b])
    assert (both.requests, both.rps, both.duration_s) == (400, 200.0, 2.1)
    assert both.p50_ms == pytest.approx(2.5) and both.p99_ms == pytest.approx(5.0)
    assert both.errors == 3


@pytest.mark.parametrize(
    ("total", "ways", "split"),
    [(32, 3, [11, 11, 10]), (1, 3, [1]), (256, 3, [86, 85, 85]), (2, 3, [1, 1]), (9, 3, [3, 3, 3])],
)
def test_split_connections(total: int, ways: int, split: list[int]):
    assert split_connections(total, ways) == split
    assert sum(split) == total


def test_parse_proc_stat_with_parens_and_spaces_in_name():
    line = (
        "4242 (python (worker) 1) S 4000 4100 4100 0 -1 4194560 1234 0 0 0 "
        "731 95 3 1 20 0 4 0 98765 812345678 20480 18446744073709551615"
    )
    st = parse_proc_stat(line)
    assert (st.pid, st.pgid, st.utime, st.stime, st.rss_pages) == (4242, 4100, 731, 95, 20480)
    assert st.cpu_ticks == 826


def test_group_totals_only_counts_the_group():
    stats = [ProcStat(1, 10, 5, 1, 100), ProcStat(2, 10, 2, 2, 50), ProcStat(3, 11, 99, 99, 999)]
    assert group_totals(stats, 10) == (10, 150)
    assert group_totals(stats, 12) == (0, 0)


def test_median_ratio_cpu():
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert ratio(1.0, 4.0) == 0.25 and ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    assert cpu_us_per_request(0.5, 1000) == pytest.approx(500.0)
    assert cpu_us_per_request(0.5, 0) is None


def test_profile_parse_raw_leaves_out_the_idle_loop() -> None:
    from benchmarks.overhead.profile import parse_raw

    text = (
        "<module> (switchyard:8);Runner.run (asyncio/runners.py:118) 50\n"
        "Exchange.run (gateway/proxy.py:160);Upstream.post (gateway/upstream.py:80) 30\n"
        "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:542) 15\n"
        "Upstream.post (gateway/upstream.py:80) 5\n"
        "garbage line\n"
    )
    funcs, packages, busy = parse_raw(text)
    assert busy == 50
    assert funcs.most_common(1) == [("Upstream.post (gateway/upstream.py)", 35)]
    assert packages == {"gateway": 35, "uvicorn": 15}
