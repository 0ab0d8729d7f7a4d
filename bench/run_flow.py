"""Run `build-and-deploy` once in this process and print what it did as one JSON line.

bench/pipeline_bench.py starts this per measured run: the sandbox stays in the
parent process and this child talks to it over HTTP, as a worker talks to AWS
and a cluster, so the wall time and peak RSS measured here are the flow's own.

    python -m bench.run_flow CONFIG --aws-url URL --region R --kubeconfig PATH [--params JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from flows.pipeline import build_and_deploy, connected_locally
from sandbox.aws import sandbox_credentials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--aws-url", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--params", default="{}", help="more flow parameters, as JSON")
    args = parser.parse_args()
    started = time.perf_counter()
    with connected_locally(sandbox_credentials(args.aws_url, args.region), args.kubeconfig):
        state = asyncio.run(build_and_deploy(config=args.config, **json.loads(args.params), return_state=True))
    wall = time.perf_counter() - started
    result = state.result(raise_on_failure=False)
    components = {c.name: {"outcome": c.outcome, "seconds": c.seconds, "spans": c.spans} for c in getattr(result, "components", [])}
    stages = getattr(result, "seconds", {}).get("total")
    print(json.dumps({"wall_s": wall, "stages_s": stages, "completed": state.is_completed(),
                      "message": state.message, "components": components}))


if __name__ == "__main__":
    main()
