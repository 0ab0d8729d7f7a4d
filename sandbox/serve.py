"""`make serve`: the deployments served against the sandbox, for trying the pipeline from the Prefect UI.

Expects a Prefect server at PREFECT_API_URL (the Makefile starts one on 127.0.0.1:4200).
The example app is committed to a fresh git repository; a `sandbox` target block points
the flow at moto and the emulated cluster, which live as long as this process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import serve

from blocks.target import BuildKitPipelineTarget
from deployments.serve import deployments
from flows.config import load_config
from sandbox.example import create_example_repo
from sandbox.stack import Sandbox


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="buildkit-serve-") as workdir, Sandbox() as sandbox:
        pipeline_file = create_example_repo(Path(workdir) / "weather-app")
        connection = sandbox.prepare(load_config(pipeline_file))
        BuildKitPipelineTarget(
            aws_credentials=connection["aws_credentials"], kubeconfig_path=connection["kubeconfig"]
        ).save("sandbox", overwrite=True)
        print(f"example app: {pipeline_file.parent}")
        print("open http://127.0.0.1:4200/deployments, pick build-and-deploy/on-demand, and press Run", flush=True)
        serve(*deployments(str(pipeline_file), "sandbox"), pause_on_shutdown=True)


if __name__ == "__main__":
    main()
