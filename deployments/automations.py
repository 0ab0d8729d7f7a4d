"""Create the automations an operator wants on the pipeline's deployments.

    python -m deployments.automations --notify slack-webhook/ops-alerts

- `buildkit-pipeline: run failed or crashed` sends the named notification block (any Prefect notification
  block, `<block-type-slug>/<name>`) when a run of the deployments turns Failed or Crashed.
- `buildkit-pipeline: zombie runs` (unless --no-zombies) marks a run Crashed when its heartbeats stop: the worker
  or its machine died and nothing else would ever end the run (Prefect's "Detect zombie flows" how-to). Runs send
  a `prefect.flow-run.heartbeat` every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by default, at least 30);
  the run is declared dead after three missed heartbeats. Crashed, it then also triggers the notification.

Both are replaced when the script runs again (they are found by name), so it can run after every deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import timedelta

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

DEPLOYMENTS = ("build-and-deploy/nightly", "build-and-deploy/on-demand", "compare-builders/compare")
FAILED, ZOMBIES = "buildkit-pipeline: run failed or crashed", "buildkit-pipeline: zombie runs"
# prefect/flow_engine.py (3.9.1) emits it with the flow run as resource and its deployment as related resource.
HEARTBEAT = "prefect.flow-run.heartbeat"
TERMINAL = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed")
MISSED_HEARTBEATS = 3
BODY = ("{{ deployment.name }} run {{ flow_run.name }} of {{ flow.name }} is {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}")


class AutomationSetupError(ValueError):
    pass


def of_deployments(deployment_ids: list[str]) -> dict:
    return {"prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids],
            "prefect.resource.role": "deployment"}


def failed_or_crashed(deployment_ids: list[str], block_document_id) -> Automation:
    return Automation(
        name=FAILED,
        description="Notify when a build-and-deploy or compare-builders run fails or crashes",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=of_deployments(deployment_ids),
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id,
                                  subject="buildkit-pipeline: {{ flow_run.name }} is {{ flow_run.state.name }}",
                                  body=BODY)],
    )


def zombie_runs(deployment_ids: list[str], heartbeat_seconds: int) -> Automation:
    """After a heartbeat, expect another heartbeat or a final state within three heartbeats, per flow run."""
    return Automation(
        name=ZOMBIES,
        description=f"Crash runs that sent no heartbeat for {MISSED_HEARTBEATS} x {heartbeat_seconds} s",
        trigger=EventTrigger(
            after={HEARTBEAT},
            expect={HEARTBEAT, *TERMINAL},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=of_deployments(deployment_ids),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {MISSED_HEARTBEATS * heartbeat_seconds} s: the worker "
                                            "or its machine stopped; build Jobs end at their activeDeadlineSeconds")],
    )


async def deployment_ids(names: list[str]) -> list[str]:
    async with get_client() as client:
        ids = []
        for name in names:
            try:
                ids.append(str((await client.read_deployment_by_name(name)).id))
            except ObjectNotFound:
                raise AutomationSetupError(f"no deployment {name}: run `prefect deploy --all` first") from None
        return ids


async def notification_block_id(slug_and_name: str):
    if "/" not in slug_and_name:
        raise AutomationSetupError(f"--notify {slug_and_name}: give <block-type-slug>/<name>, e.g. slack-webhook/ops")
    try:
        block = await Block.aload(slug_and_name)
    except ValueError as exc:
        raise AutomationSetupError(f"--notify {slug_and_name}: no such block ({exc})") from None
    if not callable(getattr(block, "notify", None)):
        raise AutomationSetupError(f"--notify {slug_and_name}: not a notification block (it has no notify())")
    return block._block_document_id


async def replace(automation: Automation) -> Automation:
    async with get_client() as client:
        for existing in await client.read_automations_by_name(automation.name):
            await client.delete_automation(existing.id)
    return await automation.acreate()


async def create_automations(notify: str, deployments: list[str], zombies: bool = True,
                             heartbeat_seconds: int | None = None) -> list[Automation]:
    ids = await deployment_ids(deployments)
    block_id = await notification_block_id(notify)
    created = [await replace(failed_or_crashed(ids, block_id))]
    if zombies:
        seconds = heartbeat_seconds or get_current_settings().flows.heartbeat_frequency or 180
        created.append(await replace(zombie_runs(ids, seconds)))
    return created


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notify", required=True, help="a notification block, <block-type-slug>/<name>")
    parser.add_argument("--deployment", action="append", help=f"<flow>/<deployment>; default: {', '.join(DEPLOYMENTS)}")
    parser.add_argument("--no-zombies", action="store_true", help="do not create the zombie-run automation")
    parser.add_argument("--heartbeat-seconds", type=int, help="the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    args = parser.parse_args(argv)
    try:
        created = asyncio.run(create_automations(args.notify, args.deployment or list(DEPLOYMENTS),
                                                 not args.no_zombies, args.heartbeat_seconds))
    except AutomationSetupError as exc:
        print(f"error: {exc}; no automation was changed", file=sys.stderr)
        raise SystemExit(2) from None
    for automation in created:
        print(f"created automation {automation.name!r} ({automation.id})")


if __name__ == "__main__":
    main()
