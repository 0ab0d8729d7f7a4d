"""How long a whole flow run may take before Prefect fails it as TimedOut.

A run's longest path is a build slot's wait, one build (at most `build.timeout_seconds`, 1800 by
default, the Job's activeDeadlineSeconds) and the releases chained by `after:` (each at most its
`timeout_seconds`, 300 by default); with more components than build slots, builds run in rounds.
Two hours covers two rounds of default builds and a few chained releases; a run still going
after that is stuck, and the deployment's next run should not wait behind it.

Prefect reads a flow's `timeout_seconds` when the module is imported, and a deployment cannot
set it, so a deployment overrides it through its environment: `job_variables: {env:
{BUILDKIT_PIPELINE_FLOW_TIMEOUT_SECONDS: "10800"}}` in prefect.yaml, or `--job-variable` per run.
"""

from __future__ import annotations

import os

ENV = "BUILDKIT_PIPELINE_FLOW_TIMEOUT_SECONDS"
DEFAULT_SECONDS = 7200


def flow_timeout_seconds() -> int:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_SECONDS
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"{ENV}={value!r}: give the flow run's time limit in whole seconds, e.g. 7200")
    return seconds
