"""`make demo`: the example app as a fresh git repository, checked by `doctor`, run end to end on the sandbox, then
asked for a forecast.

The last step is the check the migration ended with, by hand: call the deployed agent, which asks its MCP
server, through the API server's service proxy, as `kubectl get --raw` does on a real cluster (source:
kubernetes/kubectl pkg/cmd/get/get.go `--raw`, and the proxy path of kubernetes/kubernetes
pkg/registry/core/service/storage/storage.go ResourceLocation, v1.35); the sandbox's proxy is the one in
sandbox/kube/services.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flows.cli import main
from flows.config import PipelineConfig
from sandbox.example import create_example_repo
from sandbox.stack import Sandbox

KUBECTL = Path(__file__).resolve().parent.parent / ".tools" / "bin" / "kubectl"
AGENT, CITY = "weather-agent", "seattle"


def ask_the_agent(sandbox: Sandbox, config: PipelineConfig) -> int:
    release = config.component(AGENT).release
    path = f"/api/v1/namespaces/{release.namespace}/services/{release.name}:80/proxy/forecast?city={CITY}"
    kubectl = str(KUBECTL) if KUBECTL.exists() else shutil.which("kubectl") or "kubectl"
    print(f"\n$ kubectl get --raw '{path}'", flush=True)
    asked = subprocess.run([kubectl, "--kubeconfig", str(sandbox.kubeconfig), "get", "--raw", path],
                           capture_output=True, text=True, timeout=60)
    print((asked.stdout or asked.stderr).strip(), flush=True)
    return 0 if asked.returncode == 0 else 1


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="buildkit-demo-") as workdir:
        pipeline_file = create_example_repo(Path(workdir) / "weather-app")
        print(f"example app committed at {pipeline_file.parent}", flush=True)
        print("\n$ buildkit-pipeline doctor --config weather-app/buildkit-pipeline.yaml --sandbox", flush=True)
        if main(["doctor", "--config", str(pipeline_file), "--sandbox"]) != 0:
            print("doctor found a problem with the sandbox: the run would fail; see the fixes above", flush=True)
            return 1
        print("\n$ buildkit-pipeline run --config weather-app/buildkit-pipeline.yaml --sandbox", flush=True)
        return main(["run", "--config", str(pipeline_file), "--sandbox"], then=ask_the_agent)


if __name__ == "__main__":
    sys.exit(demo())
