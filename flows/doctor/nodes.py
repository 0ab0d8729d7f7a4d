"""Pre-flight checks of the nodes builds land on: the platforms the components build, and rootless BuildKit.

Where a build may run: the Nodes whose labels match `build.node_selector` and
whose taints `build.tolerations` tolerate, and, where Karpenter or EKS Auto Mode
serves `karpenter.sh/v1`, the NodePools whose template admits the same pod
(nodes they would create). How each builder uses them:

- BuildKit runs one Job per component, on whatever eligible node it lands on,
  and builds every platform there: a platform of another architecture runs its
  `RUN` steps under the QEMU emulator the moby/buildkit image carries
  (moby/buildkit v0.31.2 solver/llbsolver/ops/exec_binfmt.go `getEmulator`:
  `buildkit-qemu-<arch>` on PATH, from the Dockerfile's binfmt stage,
  tonistiigi/binfmt buildkit-v10.2.3-66 without loongarch64 and mips64). So a
  platform no node has still builds, slower; one with no emulator and no node
  does not.
- Kaniko runs `RUN` steps natively and its Job is pinned to the platform's
  architecture (flows/kaniko.py): without a node or NodePool of it, the pod
  stays Pending until `build.pending_timeout_seconds`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from flows.config import ComponentSpec, PipelineConfig
from flows.doctor import Subject
from flows.doctor.findings import Finding, failed, passed, warned
from flows.kube import with_retries

ARCH, OS = "kubernetes.io/arch", "kubernetes.io/os"
# docs.aws.amazon.com/eks/latest/userguide/associate-workload.html: "EKS Auto Mode nodes have set the value of the
# label eks.amazonaws.com/compute-type to auto"
AUTO_MODE_LABEL, AUTO_MODE_VALUE = "eks.amazonaws.com/compute-type", "auto"
# docs.aws.amazon.com/eks/latest/userguide/create-node-class.html: Auto Mode's NodeClass is eks.amazonaws.com/v1
# (self-managed Karpenter on AWS uses karpenter.k8s.aws EC2NodeClass)
AUTO_MODE_NODECLASS_GROUP = "eks.amazonaws.com"
KARPENTER_GROUP, KARPENTER_VERSION, NODEPOOLS = "karpenter.sh", "v1", "nodepools"
# aws/karpenter-provider-aws website/content/en/docs/concepts/nodepools.md (main, v1.14): "Karpenter supports amd64
# nodes, and arm64 nodes", "linux and windows operating systems"; an arch or os without a requirement may be any
KARPENTER_ARCHES, KARPENTER_OSES = frozenset({"amd64", "arm64"}), frozenset({"linux", "windows"})
# ... and concepts/scheduling.md "User-Defined Labels": a nodeSelector on a label Karpenter does not know is never
# satisfied unless the NodePool defines it (labels or requirements); these are the ones it knows
WELL_KNOWN_PREFIXES = ("kubernetes.io/arch", "kubernetes.io/os", "topology.kubernetes.io/", "topology.k8s.aws/",
                       "node.kubernetes.io/instance-type", "node.kubernetes.io/windows-build", "karpenter.sh/",
                       "karpenter.k8s.aws/")
# moby/buildkit v0.31.2 exec_binfmt.go qemuArchMap, with the emulators its image carries (see the module docstring)
EMULATED_ARCHES = frozenset({"amd64", "arm64", "arm", "s390x", "ppc64le", "riscv64", "386"})


@dataclass
class Capacity:
    """Somewhere a build pod can run: a Node, or the nodes a NodePool would create."""

    name: str
    arches: set[str]
    oses: set[str]
    auto_mode: bool
    nodepool: bool = field(default=False)


def tolerated(taints: list[dict], tolerations: list[dict]) -> bool:
    """Every NoSchedule / NoExecute taint has a matching toleration (kubernetes/kubernetes
    staging/src/k8s.io/api/core/v1/toleration.go ToleratesTaint, v1.35: empty key with Exists matches all keys,
    an empty effect all effects, Exists ignores the value)."""
    def tolerates(toleration: dict, taint: dict) -> bool:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            return False
        if toleration.get("key") and toleration["key"] != taint.get("key"):
            return False
        if toleration.get("operator") == "Exists":
            return True
        return bool(toleration.get("key")) and toleration.get("value", "") == taint.get("value", "")

    return all(any(tolerates(t, taint) for t in tolerations) for taint in taints
               if taint.get("effect") in ("NoSchedule", "NoExecute"))


def node_capacity(node: dict, selector: dict[str, str], tolerations: list[dict]) -> Capacity | None:
    metadata, spec = node.get("metadata") or {}, node.get("spec") or {}
    labels = metadata.get("labels") or {}
    if spec.get("unschedulable") or any(labels.get(k) != v for k, v in selector.items()):
        return None
    if not tolerated(spec.get("taints") or [], tolerations):
        return None
    return Capacity(f"node {metadata.get('name')}", {labels.get(ARCH, "")} - {""}, {labels.get(OS, "")} - {""},
                    labels.get(AUTO_MODE_LABEL) == AUTO_MODE_VALUE)


def _allowed(requirements: list[dict], key: str, universe: frozenset[str]) -> set[str]:
    """The values of `key` a NodePool's requirements leave (karpenter.sh/v1 NodeSelectorRequirement operators)."""
    values = set(universe)
    for requirement in requirements:
        if requirement.get("key") != key:
            continue
        operator, listed = requirement.get("operator"), set(requirement.get("values") or [])
        if operator == "In":
            values &= listed
        elif operator == "NotIn":
            values -= listed
        elif operator == "DoesNotExist":
            values = set()
    return values


def _admits(requirements: list[dict], labels: dict[str, str], key: str, value: str, auto_mode: bool) -> bool:
    """Whether a NodePool can make a node with label `key=value`."""
    if key in labels:
        return labels[key] == value
    defined = [r for r in requirements if r.get("key") == key]
    if defined:
        return value in _allowed(defined, key, frozenset({value}))
    if auto_mode and key.startswith("eks.amazonaws.com/"):
        return key != AUTO_MODE_LABEL or value == AUTO_MODE_VALUE
    return key.startswith(WELL_KNOWN_PREFIXES)


def nodepool_capacity(pool: dict, selector: dict[str, str], tolerations: list[dict]) -> Capacity | None:
    """What a karpenter.sh/v1 NodePool can provision for the build pod (spec.template.metadata.labels,
    spec.template.spec.requirements, taints and nodeClassRef), or None when it cannot take the pod."""
    template = (pool.get("spec") or {}).get("template") or {}
    spec, labels = template.get("spec") or {}, (template.get("metadata") or {}).get("labels") or {}
    requirements = spec.get("requirements") or []
    auto_mode = (spec.get("nodeClassRef") or {}).get("group") == AUTO_MODE_NODECLASS_GROUP
    if not all(_admits(requirements, labels, k, v, auto_mode) for k, v in selector.items()):
        return None
    if not tolerated(spec.get("taints") or [], tolerations):
        return None
    arches = {labels[ARCH]} if ARCH in labels else _allowed(requirements, ARCH, KARPENTER_ARCHES)
    oses = {labels[OS]} if OS in labels else _allowed(requirements, OS, KARPENTER_OSES)
    if ARCH in selector:
        arches &= {selector[ARCH]}
    if OS in selector:
        oses &= {selector[OS]}
    if not arches or not oses:
        return None
    return Capacity(f"NodePool {(pool.get('metadata') or {}).get('name')}", arches, oses, auto_mode, nodepool=True)


async def has_nodepools(api: client.ApiClient) -> bool:
    """Whether the API server serves karpenter.sh/v1 (discovery, as `kubectl api-versions` asks)."""
    groups = await with_retries(lambda: client.ApisApi(api).get_api_versions())
    return any(v.group_version == f"{KARPENTER_GROUP}/{KARPENTER_VERSION}"
               for group in groups.groups or [] for v in group.versions or [])


async def capacity(api: client.ApiClient, config: PipelineConfig) -> tuple[list[Capacity], bool]:
    """Every eligible Node and NodePool; and whether NodePools are served at all."""
    selector, tolerations = config.build.node_selector, config.build.tolerations
    # the JSON as sent: only labels, taints and spec.unschedulable matter here, and the client's Node model refuses
    # a node whose status.nodeInfo lacks a field it requires
    response = await with_retries(lambda: client.CoreV1Api(api).list_node(_preload_content=False))
    nodes = json.loads(await response.read())
    found = [c for node in nodes.get("items") or [] if (c := node_capacity(node, selector, tolerations))]
    served = await has_nodepools(api)
    if served:
        pools = await with_retries(lambda: client.CustomObjectsApi(api).list_cluster_custom_object(
            KARPENTER_GROUP, KARPENTER_VERSION, NODEPOOLS))
        found += [c for pool in pools.get("items") or [] if (c := nodepool_capacity(pool, selector, tolerations))]
    return found, served


def _where(capacity: list[Capacity]) -> str:
    arches = sorted({a for c in capacity for a in c.arches})
    return ", ".join(arches) or "none"


def _nodepool_fix(arch: str, os: str, config: PipelineConfig) -> str:
    selector = "".join(f"\n        {k}: {v}" for k, v in config.build.node_selector.items() if k not in (ARCH, OS))
    labels = f"\n  template:\n    metadata:\n      labels:{selector}" if selector else "\n  template:"
    return (f"add a node group of {os}/{arch} nodes, or a Karpenter / EKS Auto Mode NodePool that can create them:\n"
            f"apiVersion: karpenter.sh/v1\nkind: NodePool\nmetadata:\n  name: builds-{arch}\nspec:{labels}\n"
            f"    spec:\n      requirements:\n        - {{key: kubernetes.io/arch, operator: In, values: [{arch}]}}\n"
            f"        - {{key: kubernetes.io/os, operator: In, values: [{os}]}}\n"
            f"      nodeClassRef: {{group: eks.amazonaws.com, kind: NodeClass, name: default}}"
            f"   # or your EC2NodeClass (group karpenter.k8s.aws)")


def platform_findings(config: PipelineConfig, where: list[Capacity]) -> Finding:
    """One finding for every component's platforms against the eligible capacity."""
    check = "nodes.platforms"
    if not where:
        selector = ", ".join(f"{k}={v}" for k, v in config.build.node_selector.items()) or "none"
        return failed(check, f"no node or NodePool can take a build pod (build.node_selector: {selector}, "
                      f"build.tolerations: {len(config.build.tolerations)})",
                      "label nodes (kubectl label node <node> key=value) or change build.node_selector / "
                      "build.tolerations to match the nodes builds may use")
    problems: list[tuple[str, str, str]] = []  # (status, found, fix)
    for i, component in enumerate(config.components):
        problems += _component_problems(i, component, config, where)
    if not problems:
        built = sorted({p for c in config.components for p in config.platforms_of(c)}) or ["the node's own"]
        return passed(check, f"platforms {', '.join(built)}: nodes or NodePools for builds run {_where(where)}")
    status = "fail" if any(s == "fail" for s, _, _ in problems) else "warn"
    finding = failed if status == "fail" else warned
    return finding(check, "; ".join(found for _, found, _ in problems),
                   "\n".join(dict.fromkeys(fix for _, _, fix in problems)))


def _component_problems(i: int, component: ComponentSpec, config: PipelineConfig,
                        where: list[Capacity]) -> list[tuple[str, str, str]]:
    key = f"components[{i}].platforms" if component.platforms is not None else "build.platforms"
    builder, problems = config.builder_of(component), []
    for platform in config.platforms_of(component):
        os, arch = platform.split("/")[:2]
        if any(arch in c.arches and os in c.oses for c in where):
            continue
        drop = f"or drop {platform} from {key}"
        if builder == "buildkit" and os == "linux" and arch in EMULATED_ARCHES:
            problems.append(("warn", f"{component.name}: no {platform} node or NodePool (builds run on "
                             f"{_where(where)}): BuildKit builds it under QEMU emulation, several times slower",
                             _nodepool_fix(arch, os, config) + f"\n(a BuildKit pod on such a node builds {platform} "
                             f"natively), {drop}"))
        elif builder == "buildkit":
            problems.append(("fail", f"{component.name}: {platform} has no node or NodePool and BuildKit has no "
                             "emulator for it", f"{_nodepool_fix(arch, os, config)}\n{drop}"))
        else:
            problems.append(("fail", f"{component.name}: the Kaniko Job for {platform} waits for a node of "
                             f"architecture {arch} and none can take it (builds run on {_where(where)})",
                             f"{_nodepool_fix(arch, os, config)}\n{drop}, or build it with BuildKit "
                             f"(components[{i}].builder: buildkit), which emulates it"))
    return problems


def rootless(config: PipelineConfig, where: list[Capacity]) -> Finding:
    """Rootless BuildKit needs user namespaces; EKS Auto Mode nodes have none (user.max_user_namespaces=0, DESIGN.md
    §1), so rootlesskit fails there (`fork/exec /proc/self/exe: no space left on device`)."""
    check = "nodes.rootless"
    users = [c.name for c in config.components if config.builder_of(c) == "buildkit"]
    if config.build.mode != "rootless" or not users:
        return passed(check, f"build.mode {config.build.mode}"
                      + ("" if users else " (no component builds with BuildKit)") + ": no user namespaces needed")
    auto = [c.name for c in where if c.auto_mode]
    if auto:
        return failed(check, f"build.mode is rootless, and builds may land on EKS Auto Mode capacity "
                      f"({', '.join(auto)}), whose nodes allow no user namespaces: rootless BuildKit cannot start",
                      "in the pipeline file:\nbuild:\n  mode: privileged\n"
                      "(the build namespace then needs pod-security.kubernetes.io/enforce=privileged)")
    return passed(check, "build.mode is rootless and no eligible node or NodePool is EKS Auto Mode; the nodes "
                  "must allow user namespaces (sysctl user.max_user_namespaces > 0), which the API does not show")


async def checks(subject: Subject) -> list[Finding]:
    if subject.api is None:
        return [failed("nodes.platforms", f"not checked: no Kubernetes client ({subject.kube_error})",
                       "see the cluster checks")]
    try:
        where, _ = await capacity(subject.api, subject.config)
    except ApiException as exc:
        if exc.status == 403:
            return [warned("nodes.platforms", "may not list nodes or NodePools (403): the platforms are not checked",
                           "grant the doctor's identity `list` on nodes (and on nodepools.karpenter.sh), e.g. a "
                           "ClusterRole with rules [{apiGroups: [\"\"], resources: [nodes], verbs: [list]}, "
                           "{apiGroups: [karpenter.sh], resources: [nodepools], verbs: [list]}]")]
        raise
    return [platform_findings(subject.config, where), rootless(subject.config, where)]
