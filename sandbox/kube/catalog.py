"""The resource types the emulator serves, and the discovery documents built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = {"status": ("get", "patch", "update"), "log": ("get",), "scale": ("get", "patch", "update")}


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = field(default=())
    verbs: tuple[str, ...] = ALL_VERBS
    stored: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified_name(self) -> str:
        """How the API server names the resource in messages: `jobs.batch`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _core(plural: str, kind: str, **kw) -> ResourceType:
    return ResourceType("", "v1", plural, kind, **kw)


RESOURCE_TYPES: tuple[ResourceType, ...] = (
    _core("namespaces", "Namespace", namespaced=False, short_names=("ns",), subresources=("status",)),
    _core("nodes", "Node", namespaced=False, short_names=("no",), subresources=("status",)),
    _core("pods", "Pod", short_names=("po",), subresources=("status", "log"), categories=("all",)),
    _core("secrets", "Secret"),
    _core("configmaps", "ConfigMap", short_names=("cm",)),
    _core("services", "Service", short_names=("svc",), subresources=("status",), categories=("all",)),
    _core("serviceaccounts", "ServiceAccount", short_names=("sa",)),
    _core("events", "Event", short_names=("ev",)),
    _core("endpoints", "Endpoints", short_names=("ep",)),
    _core("persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",), subresources=("status",)),
    _core("persistentvolumes", "PersistentVolume", namespaced=False, short_names=("pv",), subresources=("status",)),
    _core("resourcequotas", "ResourceQuota", short_names=("quota",), subresources=("status",)),
    _core("limitranges", "LimitRange", short_names=("limits",)),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",),
                 subresources=("status", "scale"), categories=("all",)),
    ResourceType("apps", "v1", "replicasets", "ReplicaSet", short_names=("rs",),
                 subresources=("status", "scale"), categories=("all",)),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet", short_names=("sts",),
                 subresources=("status", "scale"), categories=("all",)),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", short_names=("ds",),
                 subresources=("status",), categories=("all",)),
    ResourceType("apps", "v1", "controllerrevisions", "ControllerRevision"),
    ResourceType("batch", "v1", "jobs", "Job", subresources=("status",), categories=("all",)),
    ResourceType("batch", "v1", "cronjobs", "CronJob", short_names=("cj",), subresources=("status",),
                 categories=("all",)),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=("pdb",),
                 subresources=("status",)),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=("ing",), subresources=("status",)),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
    ResourceType("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler",
                 short_names=("hpa",), subresources=("status",)),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    # a review is answered, never stored: POST only (kubernetes/kubernetes
    # pkg/registry/authorization/selfsubjectaccessreview/rest.go, v1.35: rest.Creater, cluster-scoped)
    ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview",
                 namespaced=False, verbs=("create",), stored=False),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, short_names=("crd", "crds"), subresources=("status",)),
)

BY_PLURAL: dict[str, ResourceType] = {rt.plural: rt for rt in RESOURCE_TYPES}
BY_KIND: dict[str, ResourceType] = {rt.kind: rt for rt in RESOURCE_TYPES}


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    rt = BY_PLURAL.get(plural)
    if rt is None or rt.group != group or rt.version != version:
        return None
    return rt


def resource_type(plural: str) -> ResourceType:
    try:
        return BY_PLURAL[plural]
    except KeyError:
        raise KeyError(f"the emulator does not serve the resource {plural!r}") from None


def groups() -> dict[str, list[str]]:
    """Non-core group name -> versions, in catalog order."""
    result: dict[str, list[str]] = {}
    for rt in RESOURCE_TYPES:
        if rt.group and rt.version not in result.setdefault(rt.group, []):
            result[rt.group].append(rt.version)
    return result


def api_versions_doc() -> dict:
    return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}


def _group_doc(name: str, versions: list[str]) -> dict:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_group_list_doc() -> dict:
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [_group_doc(name, versions) for name, versions in groups().items()]}


def api_group_doc(name: str) -> dict | None:
    versions = groups().get(name)
    if versions is None:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(name, versions)}


def api_resource_list_doc(group: str, version: str) -> dict | None:
    served = [rt for rt in RESOURCE_TYPES if rt.group == group and rt.version == version]
    if not served:
        return None
    resources = []
    for rt in served:
        resources.append({
            "name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced, "kind": rt.kind,
            "verbs": list(rt.verbs), "shortNames": list(rt.short_names), "categories": list(rt.categories),
            "storageVersionHash": "",
        })
        for sub in rt.subresources:
            resources.append({"name": f"{rt.plural}/{sub}", "singularName": "", "namespaced": rt.namespaced,
                              "kind": "Pod" if sub == "log" else ("Scale" if sub == "scale" else rt.kind),
                              "verbs": list(SUBRESOURCE_VERBS[sub])})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
