"""Pre-flight checks: the cluster answers, the build namespace, its Pod Security level and ServiceAccount exist, and
the target's identity may do every API call a run makes, asked with SelfSubjectAccessReview.

What a run needs is taken from the project's RBAC manifests, which tests measure against what the flow and helm do
(tests/test_security.py for the build namespace, tests/test_rbac.py for the release namespaces): the build
namespace's Role in deployments/rbac.yaml; in each release namespace helm's release Secrets and the rollout check's
reads (deployments/rbac-release.yaml), every kind the release's chart renders (`helm template`, mapped to a resource
with the API's discovery), the test hook Pods when `helm test` runs, `services/proxy` for the MCP and HTTP checks
(flows/verify.py), and namespaces when helm creates the release's namespace (deployments/rbac-create-namespace.yaml).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from flows.config import BuildSpec, PipelineConfig, ReleaseSpec
from flows.doctor import Subject
from flows.doctor.findings import Finding, failed, passed, warned
from flows.kube import with_retries

DEPLOYMENTS = Path(__file__).resolve().parents[2] / "deployments"
RBAC_FILE, RELEASE_RBAC_FILE = DEPLOYMENTS / "rbac.yaml", DEPLOYMENTS / "rbac-release.yaml"
CREATE_NAMESPACE_RBAC_FILE = DEPLOYMENTS / "rbac-create-namespace.yaml"
SHIPPED_BUILD_NAMESPACE = "build"
ENFORCE = "pod-security.kubernetes.io/enforce"
LEVELS = ("privileged", "baseline", "restricted")
CHART_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


@dataclass(frozen=True, order=True)
class Permission:
    """One verb on one resource (`pods/log`: resource and subresource), in a namespace ("" at cluster scope)."""

    namespace: str
    group: str
    resource: str
    verb: str
    name: str = ""

    def describe(self) -> str:
        group = f".{self.group}" if self.group else ""
        named = f" {self.name}" if self.name else ""
        return f"{self.verb} {self.resource}{group}{named}"


# ---------------------------------------------------------------- what a run needs


def _role_rules(path: Path, kind: str) -> list[dict]:
    [role] = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == kind]
    return role["rules"]


def _from_rules(rules: list[dict], namespace: str, resources: set[str] | None = None) -> set[Permission]:
    return {Permission(namespace, group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]
            if resources is None or resource in resources}


def build_namespace_needs(namespace: str) -> set[Permission]:
    """The Role of deployments/rbac.yaml: exactly what a run does in the build namespace (tests/test_security.py)."""
    return _from_rules(_role_rules(RBAC_FILE, "Role"), namespace)


# deployments/rbac-release.yaml, split by who needs what: helm's storage driver keeps a release's revisions as
# Secrets (helm/helm pkg/storage/driver/secrets.go, v4.1.4: get, list, create, update, delete); `--wait` and the
# flow's rollout check read Deployments, ReplicaSets, Pods, their logs and Events (flows/rollout.py,
# flows/diagnose.py); `helm test` creates its hook Pods by server-side apply, deletes the previous ones, watches
# them and reads their logs (helm/helm pkg/action/release_testing.go, v4.1.4); the MCP and HTTP checks go through
# services/proxy with the verbs of GET, POST and DELETE (flows/verify.py).
HELM_STORAGE = {("", "secrets"): ("get", "list", "create", "update", "delete")}
ROLLOUT = {("apps", "deployments"): ("get", "list", "watch"), ("apps", "replicasets"): ("get", "list", "watch"),
           ("", "pods"): ("get", "list", "watch"), ("", "pods/log"): ("get",), ("", "events"): ("list",)}
HELM_TEST = {("", "pods"): ("get", "list", "watch", "create", "patch", "delete"), ("", "pods/log"): ("get",)}


def _needs(table: dict, namespace: str) -> set[Permission]:
    return {Permission(namespace, group, resource, verb) for (group, resource), verbs in table.items()
            for verb in verbs}


def is_test_hook(document: dict) -> bool:
    hooks = ((document.get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook", "")
    return "test" in [h.strip() for h in hooks.split(",")]


def release_needs(release: ReleaseSpec, documents: list[dict], resources: dict[tuple[str, str], tuple[str, bool]]
                  ) -> tuple[set[Permission], list[str]]:
    """Every permission one release's deploy and verify need, and the kinds discovery does not know.

    `resources` maps (apiVersion, kind) to (resource, namespaced), as the API's discovery lists them.
    """
    namespace = release.namespace
    needs = _needs(HELM_STORAGE, namespace) | _needs(ROLLOUT, namespace)
    unknown = []
    hooks = [d for d in documents if is_test_hook(d)]
    for document in documents:
        if document in hooks:
            continue
        key = (document.get("apiVersion", ""), document.get("kind", ""))
        if key not in resources:
            unknown.append(f"{key[1]} ({key[0]})")
            continue
        resource, namespaced = resources[key]
        group = key[0].rpartition("/")[0]
        where = ((document.get("metadata") or {}).get("namespace") or namespace) if namespaced else ""
        needs |= {Permission(where, group, resource, verb) for verb in CHART_VERBS}
    verify = release.verify
    if verify.helm_test or (verify.helm_test is None and hooks):
        needs |= _needs(HELM_TEST, namespace)
    proxied = {(check.service, check.port, ("get", "create", "delete")) for check in [verify.mcp] if check}
    proxied |= {(check.service, check.port, ("get",)) for check in verify.http}
    needs |= {Permission(namespace, "", "services/proxy", verb, f"{service}:{port}")
              for service, port, verbs in proxied for verb in verbs}
    if release.create_namespace:
        # helm 4 creates the namespace by server-side apply of its name: `patch`, and `create` as it is new
        # (deployments/rbac-create-namespace.yaml)
        needs |= {Permission("", "", "namespaces", verb, namespace) for verb in ("create", "patch")}
    return needs, sorted(set(unknown))


# ---------------------------------------------------------------- asking the API server


async def allowed(api: client.ApiClient, permission: Permission) -> bool:
    resource, _, subresource = permission.resource.partition("/")
    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            namespace=permission.namespace or None, group=permission.group, resource=resource,
            subresource=subresource or None, verb=permission.verb, name=permission.name or None)))
    answer = await with_retries(lambda: client.AuthorizationV1Api(api).create_self_subject_access_review(review))
    return bool(answer.status.allowed)


async def missing(api: client.ApiClient, needs: set[Permission]) -> list[Permission]:
    ordered = sorted(needs)
    answers = await asyncio.gather(*(allowed(api, p) for p in ordered))
    return [p for p, ok in zip(ordered, answers) if not ok]


async def discovery(api: client.ApiClient, api_versions: set[str]) -> dict[tuple[str, str], tuple[str, bool]]:
    """(apiVersion, kind) -> (resource, namespaced) for the group versions asked, from the API's discovery."""
    found = {}
    for api_version in sorted(api_versions):
        path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        try:
            listed = await api.call_api(path, "GET", response_types_map={200: "V1APIResourceList"},
                                        auth_settings=["BearerToken"], _return_http_data_only=True)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise
        for resource in listed.resources:
            if "/" not in resource.name:
                found[(api_version, resource.kind)] = (resource.name, resource.namespaced)
    return found


# ---------------------------------------------------------------- the charts


async def rendered(subject: Subject, component) -> list[dict]:
    """The objects `helm template` renders for a component's release (Subject.manifest); none for a chart that
    does not render, which pipeline.charts reports."""
    from flows.helm import DeployFailed

    try:
        manifest = await subject.manifest(component)
    except DeployFailed:
        return []
    return [d for d in yaml.safe_load_all(manifest) if isinstance(d, dict) and d.get("kind")]


# ---------------------------------------------------------------- the fixes


def in_build_namespace(text: str, build_namespace: str) -> str:
    """A shipped RBAC manifest with `build` (its metadata and subjects' namespace) replaced by the build namespace,
    as README's RBAC step says when the build namespace has another name."""
    documents = [d for d in yaml.safe_load_all(text) if d]
    for document in documents:
        if (document.get("metadata") or {}).get("namespace") == SHIPPED_BUILD_NAMESPACE:
            document["metadata"]["namespace"] = build_namespace
        for subject in document.get("subjects") or []:
            if subject.get("namespace") == SHIPPED_BUILD_NAMESPACE:
                subject["namespace"] = build_namespace
    return yaml.safe_dump_all(documents, sort_keys=False)


def apply_command(path: Path, build_namespace: str, namespace: str | None = None) -> str:
    target = f" -n {namespace}" if namespace else ""
    relative = f"deployments/{path.name}"
    if build_namespace == SHIPPED_BUILD_NAMESPACE:
        return f"kubectl apply{target} -f {relative}"
    return (f"sed -E 's/^( *namespace:) {SHIPPED_BUILD_NAMESPACE}$/\\1 {build_namespace}/' {relative}"
            f" | kubectl apply{target} -f -")


def rules_yaml(permissions: list[Permission]) -> str:
    """The missing permissions as RBAC rules, one per resource (and name)."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for p in permissions:
        grouped.setdefault((p.group, p.resource, p.name), []).append(p.verb)
    rules = [{"apiGroups": [group], "resources": [resource], **({"resourceNames": [name]} if name else {}),
              "verbs": verbs} for (group, resource, name), verbs in grouped.items()]
    return yaml.safe_dump(rules, sort_keys=False, default_flow_style=None).rstrip()


def _merge_rules(current: list[dict], wanted: list[dict]) -> list[dict]:
    return current + [rule for rule in wanted if rule not in current]


async def apply_merged(api: client.ApiClient, document: dict) -> None:
    """Create `document`, or add what it has to the existing object: a role's rules, a binding's subjects;
    nothing an operator set is removed or replaced."""
    kind, meta = document["kind"], document["metadata"]
    namespace, name = meta.get("namespace"), meta["name"]
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    calls = {
        "ServiceAccount": (lambda: core.read_namespaced_service_account(name, namespace),
                           lambda: core.create_namespaced_service_account(namespace, document), None),
        "Namespace": (lambda: core.read_namespace(name), lambda: core.create_namespace(document), None),
        "Role": (lambda: rbac.read_namespaced_role(name, namespace),
                 lambda: rbac.create_namespaced_role(namespace, document),
                 lambda body: rbac.replace_namespaced_role(name, namespace, body)),
        "ClusterRole": (lambda: rbac.read_cluster_role(name), lambda: rbac.create_cluster_role(document),
                        lambda body: rbac.replace_cluster_role(name, body)),
        "RoleBinding": (lambda: rbac.read_namespaced_role_binding(name, namespace),
                        lambda: rbac.create_namespaced_role_binding(namespace, document),
                        lambda body: rbac.replace_namespaced_role_binding(name, namespace, body)),
        "ClusterRoleBinding": (lambda: rbac.read_cluster_role_binding(name),
                               lambda: rbac.create_cluster_role_binding(document),
                               lambda body: rbac.replace_cluster_role_binding(name, body)),
    }
    read, create, replace = calls[kind]
    try:
        current = api.sanitize_for_serialization(await read())
    except ApiException as exc:
        if exc.status != 404:
            raise
        await create()
        return
    field = {"Role": "rules", "ClusterRole": "rules", "RoleBinding": "subjects",
             "ClusterRoleBinding": "subjects"}.get(kind)
    if field is None:
        return
    merged = _merge_rules(current.get(field) or [], document.get(field) or [])
    if merged != (current.get(field) or []):
        await replace({**current, field: merged})


async def apply_manifest(api: client.ApiClient, text: str, namespace: str | None = None) -> None:
    for document in yaml.safe_load_all(text):
        if not document:
            continue
        if namespace and document["kind"] in ("Role", "RoleBinding", "ServiceAccount"):
            document["metadata"]["namespace"] = namespace
        await apply_merged(api, document)


# ---------------------------------------------------------------- the checks


def needed_level(config: PipelineConfig) -> tuple[str, str]:
    """The least Pod Security level that admits every builder the components use, and why.

    Pod Security Standards (kubernetes/website content/en/docs/concepts/security/pod-security-standards.md):
    baseline refuses privileged containers and seccomp or AppArmor profiles set to Unconfined, which privileged
    BuildKit and rootless BuildKit set (flows/build.py `_security`); the Kaniko Job sets no securityContext
    (flows/kaniko.py), which baseline admits and restricted refuses (runAsNonRoot, allowPrivilegeEscalation=false,
    capabilities drop ALL, a seccomp profile are required there).
    """
    builders = {config.builder_of(c) for c in config.components}
    if "buildkit" in builders:
        why = ("privileged BuildKit runs a privileged container" if config.build.mode == "privileged" else
               "rootless BuildKit sets seccomp and AppArmor to Unconfined")
        return "privileged", why
    return "baseline", "Kaniko runs as root with the runtime's default capabilities"


def namespace_fix(namespace: str, level: str) -> str:
    return (f"kubectl create namespace {namespace}\n"
            f"kubectl label namespace {namespace} {ENFORCE}={level}")


UNREADABLE = "unreadable"


async def check_build_namespace(api: client.ApiClient, build: BuildSpec, level: str) -> tuple[Finding, dict | str | None]:
    """The finding and the namespace (None when it does not exist, UNREADABLE when the identity may not read it)."""
    core = client.CoreV1Api(api)
    try:
        found = api.sanitize_for_serialization(await with_retries(lambda: core.read_namespace(build.namespace)))
    except ApiException as exc:
        if exc.status == 403:
            return warned("cluster.build-namespace", f"the target's identity may not read the namespace "
                          f"{build.namespace} (get namespaces), so whether it exists is not known",
                          f"kubectl get namespace {build.namespace} --show-labels"), UNREADABLE
        if exc.status != 404:
            raise

        async def create() -> None:
            await apply_merged(api, {"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": build.namespace, "labels": {ENFORCE: level}}})
        return failed("cluster.build-namespace", f"the build namespace {build.namespace} (build.namespace) does "
                      "not exist", namespace_fix(build.namespace, level), create), None
    return passed("cluster.build-namespace", f"the build namespace {build.namespace} exists"), found


def check_pod_security(api: client.ApiClient, config: PipelineConfig, namespace: dict | str | None,
                       level: str, why: str) -> Finding:
    name = config.build.namespace
    label_fix = f"kubectl label namespace {name} {ENFORCE}={level}"
    if namespace is None:
        return failed("cluster.pod-security", f"the build namespace {name} does not exist",
                      namespace_fix(name, level))
    if namespace == UNREADABLE:
        return warned("cluster.pod-security", f"the target's identity may not read the namespace {name}'s labels; "
                      f"the builds need Pod Security {level} ({why})",
                      f"kubectl get namespace {name} -o jsonpath='{{.metadata.labels}}'  # then, unless it says "
                      f"{ENFORCE}: {level}:\n{label_fix} --overwrite")
    labels = (namespace.get("metadata") or {}).get("labels") or {}
    current = labels.get(ENFORCE)
    if current is None:
        async def label() -> None:
            await client.CoreV1Api(api).patch_namespace(name, {"metadata": {"labels": {ENFORCE: level}}})
        return warned("cluster.pod-security",
                      f"namespace {name} has no {ENFORCE} label: the cluster's default level applies (privileged "
                      f"unless the API server's PodSecurity admission configuration sets another); the builds need "
                      f"{level} ({why})", label_fix, label)
    if current not in LEVELS:
        return failed("cluster.pod-security", f"namespace {name}: {ENFORCE}={current} is not a level "
                      f"({', '.join(LEVELS)}); the builds need {level} ({why})", f"{label_fix} --overwrite")
    if LEVELS.index(current) > LEVELS.index(level):
        return failed("cluster.pod-security", f"namespace {name} enforces Pod Security {current}, which refuses the "
                      f"build pods: they need {level} ({why})", f"{label_fix} --overwrite")
    return passed("cluster.pod-security", f"namespace {name} enforces Pod Security {current}; the builds need "
                  f"{level}")


async def check_service_account(api: client.ApiClient, build: BuildSpec, namespace: dict | str | None) -> Finding:
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
               "metadata": {"name": build.service_account, "namespace": build.namespace}}
    fix = ("kubectl apply -f - <<EOF\n" + yaml.safe_dump(account, sort_keys=False) + "EOF")

    async def create() -> None:
        await apply_merged(api, account)

    if namespace is not None:
        try:
            await with_retries(lambda: client.CoreV1Api(api).read_namespaced_service_account(
                build.service_account, build.namespace))
            return passed("cluster.service-account",
                          f"the build pods' ServiceAccount {build.namespace}/{build.service_account} exists")
        except ApiException as exc:
            if exc.status == 403:
                return warned("cluster.service-account", f"the target's identity may not read the ServiceAccount "
                              f"{build.namespace}/{build.service_account} (get serviceaccounts), so whether it "
                              "exists is not known",
                              f"kubectl get serviceaccount {build.service_account} -n {build.namespace}"
                              f"  # if it is not found:\n{fix}")
            if exc.status != 404:
                raise
    return failed("cluster.service-account", f"the build pods' ServiceAccount {build.service_account} "
                  f"(build.service_account) does not exist in {build.namespace}", fix, create)


def _listing(permissions: list[Permission]) -> str:
    return ", ".join(p.describe() + ("" if p.namespace else " (cluster-wide)") for p in permissions)


async def check_build_rbac(api: client.ApiClient, build_namespace: str) -> Finding:
    lacking = await missing(api, build_namespace_needs(build_namespace))
    if not lacking:
        return passed("cluster.rbac", f"in {build_namespace}: every call a build makes is allowed")

    async def repair() -> None:
        await apply_manifest(api, in_build_namespace(RBAC_FILE.read_text(), build_namespace))

    fix = (f"{apply_command(RBAC_FILE, build_namespace)}\n"
           f"(it binds the ServiceAccount {build_namespace}/buildkit-pipeline; for another identity, grant it these "
           f"rules in {build_namespace}:)\n{rules_yaml(lacking)}")
    return failed("cluster.rbac", f"in {build_namespace}: not allowed to {_listing(lacking)}", fix, repair)


async def check_release_rbac(api: client.ApiClient, config: PipelineConfig, namespace: str,
                             needs: set[Permission], unknown: list[str], create_namespace: bool) -> Finding:
    lacking = await missing(api, needs)
    problems = [f"not allowed to {_listing(lacking)}"] if lacking else []
    problems += [f"the chart renders kinds the cluster does not serve: {', '.join(unknown)}"] if unknown else []
    if not problems:
        return passed("cluster.rbac", f"in {namespace}: every call helm, the rollout check and verify make is allowed")
    build_namespace = config.build.namespace
    shipped = {(p.group, p.resource, p.verb) for p in _from_rules(_role_rules(RELEASE_RBAC_FILE, "ClusterRole"), "")}
    beyond = [p for p in lacking if p.namespace and (p.group, p.resource, p.verb) not in shipped]
    commands = [apply_command(RELEASE_RBAC_FILE, build_namespace, namespace)]
    if create_namespace:
        commands.append(apply_command(CREATE_NAMESPACE_RBAC_FILE, build_namespace))
    fix = "\n".join(commands) + f"\n(they bind the ServiceAccount {build_namespace}/buildkit-pipeline; the rules it " \
        f"lacks:)\n{rules_yaml(lacking)}" if lacking else "\n".join(commands)
    if beyond:
        fix += "\n(add the chart's kinds above to the last rule of the ClusterRole buildkit-pipeline-release)"

    async def repair() -> None:
        await apply_manifest(api, in_build_namespace(RELEASE_RBAC_FILE.read_text(), build_namespace), namespace)
        if create_namespace:
            await apply_manifest(api, in_build_namespace(CREATE_NAMESPACE_RBAC_FILE.read_text(), build_namespace))
        if beyond:
            await apply_merged(api, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                                     "metadata": {"name": "buildkit-pipeline-release"},
                                     "rules": yaml.safe_load(rules_yaml([
                                         Permission("", p.group, p.resource, p.verb) for p in beyond]))})

    return failed("cluster.rbac", f"in {namespace}: " + "; ".join(problems), fix, repair if lacking else None)


async def check_reachable(subject: Subject) -> tuple[Finding, bool]:
    where = f"the kubeconfig {subject.kubeconfig}" if subject.kubeconfig else "the in-cluster ServiceAccount"
    fix = (f"check {where}: `kubectl{' --kubeconfig ' + subject.kubeconfig if subject.kubeconfig else ''} version`"
           " must answer; for EKS, `aws eks update-kubeconfig --name <cluster> --region "
           f"{subject.config.aws.region}` and an access entry for the identity")
    if subject.api is None:
        return failed("cluster.reachable", f"no Kubernetes client from {where}: {subject.kube_error}", fix), False
    api = subject.api
    try:
        version = await client.VersionApi(api).get_code()
        await allowed(api, Permission("", "", "namespaces", "get"))
    except ApiException as exc:
        return failed("cluster.reachable", f"the API server at {api.configuration.host} answered "
                      f"{exc.status} {exc.reason}", fix), False
    except Exception as exc:  # noqa: BLE001 - a connection that fails is the finding
        return failed("cluster.reachable", f"the API server at {api.configuration.host} did not answer: "
                      f"{type(exc).__name__}: {exc}", fix), False
    return passed("cluster.reachable", f"the API server at {api.configuration.host} answers with the target's "
                  f"credentials (Kubernetes {version.git_version})"), True


async def checks(subject: Subject) -> list[Finding]:
    reachable, ok = await check_reachable(subject)
    if not ok:
        return [reachable]
    api, config = subject.api, subject.config
    level, why = needed_level(config)
    namespace_finding, namespace = await check_build_namespace(api, config.build, level)
    findings = [reachable, namespace_finding, check_pod_security(api, config, namespace, level, why),
                await check_service_account(api, config.build, namespace),
                await check_build_rbac(api, config.build.namespace)]
    per_namespace: dict[str, tuple[set[Permission], list[str], bool]] = {}
    components = [c for c in config.components if c.release]
    documents = await asyncio.gather(*(rendered(subject, c) for c in components))
    resources = await discovery(api, {d.get("apiVersion", "") for docs in documents for d in docs})
    for component, rendered_documents in zip(components, documents):
        needs, unknown = release_needs(component.release, rendered_documents, resources)
        known, kinds, create = per_namespace.get(component.release.namespace, (set(), [], False))
        per_namespace[component.release.namespace] = (known | needs, sorted(set(kinds + unknown)),
                                                      create or component.release.create_namespace)
    for namespace, (needs, unknown, create) in per_namespace.items():
        findings.append(await check_release_rbac(api, config, namespace, needs, unknown, create))
    return findings
