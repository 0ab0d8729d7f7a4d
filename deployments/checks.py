"""Deploy-time checks, run by `prefect deploy` as build steps of prefect.yaml."""

from __future__ import annotations

import os


def require_environment(names: list[str]) -> dict:
    """Stop the deploy when a variable the deployments are templated from is unset.

    `prefect deploy` leaves an unset `{{ $NAME }}` in place as text, so without this a deployment
    would be created whose runs fail on a pipeline file named `{{ $NAME }}`.
    """
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"set {', '.join(missing)} before `prefect deploy`: BUILDKIT_PIPELINE_CONFIG is the pipeline file's path "
            "on the workers (absolute, or relative to the worker's BUILDKIT_PIPELINE_HOME checkout)")
    return {name: os.environ[name] for name in names}
