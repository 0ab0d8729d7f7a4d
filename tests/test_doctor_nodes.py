"""doctor's node checks: the platforms the components build against the nodes (and NodePools) builds may use, and
rootless BuildKit where EKS Auto Mode nodes allow no user namespaces."""

from __future__ import annotations

import asyncio
import contextlib

import yaml

from flows.config import load_config
from flows.doctor.flow import check_target
from flows.doctor.nodes import nodepool_capacity, platform_findings, rootless


def doctor(app) -> dict:
    findings = asyncio.run(check_target(app.pipeline_file, **app.flow_kwargs, say=lambda _: None))
    return {f.check: f for f in findings if f.check.startswith("nodes")}


def edit(app, old: str, new: str) -> None:
    text = app.pipeline_file.read_text()
    assert old in text
    app.pipeline_file.write_text(text.replace(old, new))


@contextlib.contextmanager
def extra_node(sandbox, name: str, arch: str, labels: dict | None = None):
    """A Ready node of `arch` in the emulator for the block's length (the session's nodes are shared)."""
    sandbox.kube.create("nodes", None, {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                              "kubernetes.io/arch": arch, **(labels or {})}},
        "spec": {"taints": [{"key": "doctor-test", "value": "only", "effect": "NoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"cpu": "4", "memory": "16Gi"},
                   "nodeInfo": {"architecture": arch, "operatingSystem": "linux"}}})
    try:
        yield
    finally:
        sandbox.kube.delete("nodes", None, name)


TOLERATE = ("build: {namespace:", "build: {tolerations: [{key: doctor-test, operator: Exists}], namespace:")


def test_the_sandbox_node_runs_the_example_apps_builds(prefect_server, example_app):
    found = doctor(example_app)
    assert [f.status for f in found.values()] == ["pass", "pass"], found
    assert found["nodes.platforms"].found == "platforms the node's own: nodes or NodePools for builds run amd64"
    assert found["nodes.rootless"].found.startswith("build.mode privileged")


def test_a_kaniko_platform_no_node_runs_fails_with_the_nodepool_to_add(prefect_server, sandbox, example_app):
    edit(example_app, "    image: agents-on-eks/weather-agent\n",
         "    image: agents-on-eks/weather-agent\n    builder: kaniko\n    platforms: [linux/arm64]\n")
    finding = doctor(example_app)["nodes.platforms"]
    assert finding.status == "fail"
    assert finding.found == ("weather-agent: the Kaniko Job for linux/arm64 waits for a node of architecture arm64 "
                             "and none can take it (builds run on amd64)")
    nodepool = yaml.safe_load("\n".join(finding.fix.splitlines()[1:]).split("   #")[0])
    assert nodepool["kind"] == "NodePool" and nodepool["apiVersion"] == "karpenter.sh/v1"
    assert {"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]} in \
        nodepool["spec"]["template"]["spec"]["requirements"]
    assert "or drop linux/arm64 from components[1].platforms" in finding.fix
    # an arm64 node passes only when the build pod tolerates its taint
    with extra_node(sandbox, "arm-1", "arm64"):
        assert doctor(example_app)["nodes.platforms"].status == "fail"
        edit(example_app, *TOLERATE)
        assert doctor(example_app)["nodes.platforms"].status == "pass"


def test_buildkit_emulates_a_missing_linux_architecture_and_cannot_build_another_os(prefect_server, example_app):
    edit(example_app, "build: {namespace:", "build: {platforms: [linux/amd64, linux/arm64], namespace:")
    finding = doctor(example_app)["nodes.platforms"]
    assert finding.status == "warn"
    assert "weather-mcp: no linux/arm64 node or NodePool (builds run on amd64): BuildKit builds it under QEMU " \
           "emulation" in finding.found
    assert "or drop linux/arm64 from build.platforms" in finding.fix
    edit(example_app, "platforms: [linux/amd64, linux/arm64]", "platforms: [windows/amd64]")
    finding = doctor(example_app)["nodes.platforms"]
    assert finding.status == "fail"
    assert "weather-mcp: windows/amd64 has no node or NodePool and BuildKit has no emulator for it" in finding.found


def test_a_node_selector_no_node_matches_fails(prefect_server, example_app):
    edit(example_app, "build: {namespace:", "build: {node_selector: {node-role: builds}, namespace:")
    finding = doctor(example_app)["nodes.platforms"]
    assert finding.status == "fail"
    assert finding.found.startswith("no node or NodePool can take a build pod (build.node_selector: node-role=builds")


def test_rootless_where_builds_may_land_on_eks_auto_mode_fails_with_privileged(prefect_server, sandbox, example_app):
    edit(example_app, "mode: privileged", "mode: rootless")
    assert doctor(example_app)["nodes.rootless"].status == "pass"
    edit(example_app, *TOLERATE)
    with extra_node(sandbox, "auto-1", "amd64", {"eks.amazonaws.com/compute-type": "auto"}):
        finding = doctor(example_app)["nodes.rootless"]
    assert finding.status == "fail"
    assert "EKS Auto Mode capacity (node auto-1)" in finding.found
    assert finding.fix.startswith("in the pipeline file:\nbuild:\n  mode: privileged")


# NodePools as Karpenter and EKS Auto Mode serve them (karpenter.sh/v1); the emulator does not serve that group
GENERAL_PURPOSE = {  # EKS Auto Mode's built-in pool: "Uses only amd64 architecture" (set-builtin-node-pools.html)
    "metadata": {"name": "general-purpose"},
    "spec": {"template": {"spec": {
        "nodeClassRef": {"group": "eks.amazonaws.com", "kind": "NodeClass", "name": "default"},
        "requirements": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
                         {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}]}}}}
GRAVITON = {
    "metadata": {"name": "graviton"},
    "spec": {"template": {"metadata": {"labels": {"node-role": "builds"}}, "spec": {
        "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
        "requirements": [{"key": "kubernetes.io/arch", "operator": "NotIn", "values": ["amd64"]}],
        "taints": [{"key": "builds", "effect": "NoSchedule"}]}}}}


def test_nodepools_give_their_architectures_to_pods_they_admit(example_app):
    config = load_config(example_app.pipeline_file)
    auto = nodepool_capacity(GENERAL_PURPOSE, {}, [])
    assert (auto.arches, auto.oses, auto.auto_mode) == ({"amd64"}, {"linux", "windows"}, True)
    # a custom label the pool does not define is never satisfied; its own label and its taint tolerated are
    assert nodepool_capacity(GENERAL_PURPOSE, {"node-role": "builds"}, []) is None
    assert nodepool_capacity(GRAVITON, {"node-role": "builds"}, []) is None
    graviton = nodepool_capacity(GRAVITON, {"node-role": "builds"}, [{"key": "builds", "operator": "Exists"}])
    assert (graviton.arches, graviton.auto_mode) == ({"arm64"}, False)

    kaniko_arm = config.model_copy(update={"components": [config.components[0].model_copy(
        update={"builder": "kaniko", "platforms": ["linux/arm64"]})]})
    assert platform_findings(kaniko_arm, [auto]).status == "fail"
    assert platform_findings(kaniko_arm, [auto, graviton]).status == "pass"
    rootless_config = config.model_copy(update={"build": config.build.model_copy(update={"mode": "rootless"})})
    assert rootless(rootless_config, [graviton]).status == "pass"
    assert rootless(rootless_config, [graviton, auto]).status == "fail"


def test_without_a_kubernetes_client_the_nodes_are_reported_unchecked(prefect_server, example_app, tmp_path):
    kwargs = {**example_app.flow_kwargs, "kubeconfig": str(tmp_path / "no-such-kubeconfig")}
    findings = asyncio.run(check_target(example_app.pipeline_file, **kwargs, say=lambda _: None))
    [finding] = [f for f in findings if f.check.startswith("nodes")]
    assert (finding.check, finding.status) == ("nodes.platforms", "fail")
    assert finding.found.startswith("not checked: no Kubernetes client (")
