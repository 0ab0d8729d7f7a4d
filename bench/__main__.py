"""`make bench`: every benchmark, one after another, each in its own process; one `name: value` line per figure.

    .venv/bin/python -m bench [--quick]

--quick runs one round of each, for a smoke check; the figures in
bench/RESULTS.md come from a full run.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

BENCHMARKS = {
    "bench.package_bench": ["--quick"],
    "bench.detect_bench": [],
    "bench.pipeline_bench": ["--rounds", "1"],
}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    failed = 0
    for module, quick_args in BENCHMARKS.items():
        print(f"# {module}", flush=True)
        failed |= subprocess.run([sys.executable, "-m", module, *(quick_args if quick else [])],
                                 stderr=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
