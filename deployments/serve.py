"""Serve the `nightly`, `on-demand`, `compare` and `doctor` deployments from one process: the single-box way to run it.

    python -m deployments.serve --config buildkit-pipeline.yaml --target production

Schedules stay active when the process stops (`pause_on_shutdown=False`), so a
restart of the box does not silently end the nightly rebuild.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from flows.compare import compare_builders
from flows.doctor.flow import doctor
from flows.pipeline import build_and_deploy

NIGHTLY_CRON, NIGHTLY_TIMEZONE = "0 2 * * *", "Europe/Berlin"


def deployments(config: str, target: str | None, cron: str = NIGHTLY_CRON, timezone: str = NIGHTLY_TIMEZONE):
    parameters = {"config": str(Path(config).resolve()), "target": target}
    nightly = build_and_deploy.to_deployment(
        name="nightly", schedules=[Cron(cron, timezone=timezone)],
        parameters={**parameters, "skip_unchanged": False},
        description="Full rebuild every night, to pick up new base images.",
    )
    on_demand = build_and_deploy.to_deployment(
        name="on-demand", parameters={**parameters, "skip_unchanged": True},
        description="Build and deploy from the UI or a script; reuses images of unchanged contexts.",
    )
    compare = compare_builders.to_deployment(
        name="compare", parameters=parameters,
        description="Build every component with BuildKit and with Kaniko from one commit, without deploying, "
                    "and compare build times, digests, sizes and layers in the builder-comparison artifact.",
    )
    checks = doctor.to_deployment(
        name="doctor", parameters=parameters,
        description="Check the AWS account, the cluster, the pipeline file and Prefect before a run, and say what "
                    "to fix; `fix: true` creates what is safe to create.",
    )
    return nightly, on_demand, compare, checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the pipeline file")
    parser.add_argument("--target", help="the BuildKit Pipeline Target block to build and deploy with")
    parser.add_argument("--cron", default=NIGHTLY_CRON)
    parser.add_argument("--timezone", default=NIGHTLY_TIMEZONE)
    args = parser.parse_args(argv)
    serve(*deployments(args.config, args.target, args.cron, args.timezone), pause_on_shutdown=False)


if __name__ == "__main__":
    main()
