"""What a run started from a deployment may point at on the worker.

Whoever can press Run on a deployment fills in its parameters, but does not own
the worker: the pipeline file a run reads must be one next to the deployment's
own (in the checkout it was deployed from), never any file the worker can read.
Connections come from a target block only (see `flows.pipeline.connection`).
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client

from flows.config import ConfigError


def confined(config: str, folder: Path) -> Path:
    """`config`, relative to `folder` unless absolute, refused unless it resolves (symlinks too) inside `folder`."""
    root = folder.resolve()
    path = (root / config).resolve()
    if not path.is_relative_to(root):
        raise ConfigError([f"config: {config!r} is outside {root}: a deployment's runs read pipeline files "
                           "only from the folder of the deployment's own pipeline file"])
    return path


async def pipeline_file(config: str, deployment_id: UUID | None) -> Path:
    """The pipeline file a run reads.

    A deployment's run may name any file in the folder of the deployment's own
    `config` (its working directory when it has none). A run started in this
    process (the CLI, the tests) reads the path it was given.
    """
    if deployment_id is None:
        return Path(config)
    async with get_client() as client:
        deployed = (await client.read_deployment(deployment_id)).parameters.get("config")
    folder = Path(deployed).resolve().parent if deployed else Path.cwd()
    return confined(config, folder)
