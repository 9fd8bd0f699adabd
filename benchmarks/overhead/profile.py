"""``python -m benchmarks.overhead.profile``: where the gateway's CPU goes, py-spy's top-N.

Starts three zero-delay fake engines and ``switchyard serve`` (round-robin; the current
tree, ``--edge`` with the production edge on, or ``--before-rev REV`` from a temporary
worktree as in the overhead benchmark), puts
wrk at c=32 on it, and samples the gateway with ``py-spy record --format raw`` meanwhile.
Prints the top-N functions by own time (the event loop's idle wait left out), the share per
package, and the CPU per request of the same run; writes JSON.

    .venv/bin/python -m benchmarks.overhead.profile [--before-rev 5f4eff4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.overhead import contenders as cont
from benchmarks.overhead.load import run_wrk
from benchmarks.overhead.regimes import REGIMES
from benchmarks.overhead.runner import start_engines

IDLE = ("Runner.run", "run_forever", "select ", "_run_once")
"""Leaf frames that are the loop waiting for events, not work."""


def parse_raw(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """py-spy's raw format (``frame;frame;... count`` per line) -> (own samples per function,
    own samples per package, busy samples). A frame reads ``func (path/file.py:line)``."""
    funcs: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if leaf.startswith(IDLE):
            continue
        n = int(count)
        busy += n
        name, _, where = leaf.partition(" (")
        path = where.split(":")[0]
        funcs[f"{name} ({path})"] += n
        packages[path.split("/")[0] if "/" in path else (path or "native")] += n
    return funcs, packages, busy


def profile(
    before_rev: str | None, seconds: float, rate: int, logs: Path, *, edge: bool = False
) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(cont.SWITCHYARD).parent / "py-spy")
    engines = start_engines(3, REGIMES["c"], logs)
    try:
        starter = (
            cont.switchyard_before(before_rev)
            if before_rev
            else cont.switchyard("round-robin", edge=edge)
        )
        run = starter(engines.urls, logs)
        try:
            raw = logs / "profile.txt"
            spy = subprocess.Popen(
                [pyspy, "record", "-p", str(run.proc.pid), "-d", str(round(seconds)),
                 "-r", str(rate), "-f", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            before = run.proc.usage()[0]
            result = run_wrk([run.url], 32, seconds, REGIMES["c"].script, auth=run.auth)
            cpu_s = run.proc.usage()[0] - before
            spy.wait(timeout=seconds + 60)
            text = raw.read_text() if raw.exists() else ""
        finally:
            run.stop()
    finally:
        engines.stop()
    funcs, packages, busy = parse_raw(text)
    return {
        "revision": before_rev or ("HEAD-edge" if edge else "HEAD"),
        "requests": result.requests,
        "req_per_s": result.rps,
        "cpu_us_per_request": cpu_s / max(1, result.requests) * 1e6,
        "busy_samples": busy,
        "top": [(f, n / max(1, busy)) for f, n in funcs.most_common(25)],
        "packages": [(p, n / max(1, busy)) for p, n in packages.most_common(12)],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead.profile", description=__doc__)
    p.add_argument("--before-rev", default=None, help="profile this git revision instead")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--edge", action="store_true", help="the production edge on (Redis, limits)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="overhead-profile-"))
    row = profile(args.before_rev, args.seconds, args.rate, logs, edge=args.edge)
    print(
        f"{row['revision']}: {row['req_per_s']:,.0f} req/s, "
        f"{row['cpu_us_per_request']:,.0f} us CPU/request, {row['busy_samples']} busy samples"
    )
    print(f"top {args.top} by own time (share of busy samples):")
    for func, share in row["top"][: args.top]:
        print(f"  {share * 100:5.1f}%  {func}")
    print("by package: " + ", ".join(f"{pk} {share * 100:.0f}%" for pk, share in row["packages"]))
    out = args.out or Path("results") / f"profile-{row['revision']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
