"""The sandbox's Kubernetes emulator against the real kubectl, helm and kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from sandbox.kube import KubeEmulator, PodHandle, patching, protobuf

ROOT = pathlib.Path(__file__).resolve().parents[1]
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
HELM = ROOT / ".tools" / "bin" / "helm"


# ------------------------------------------------------------------------ fixtures


# The namespaces the tests below work in, created beforehand as an admin would: the emulator refuses objects in a
# namespace that does not exist (NamespaceLifecycle admission).
NAMESPACES = ("web", "reapply", "jobs", "secrets", "async", "resume", "expired", "faults", "lost", "put", "gen",
              "sel", "gc", "ssa", "raw", "logs", "backoff", "deadline", "pull", "sched", "disrupt", "gap")


@pytest.fixture(scope="module")
def emu():
    emulator = KubeEmulator(rollout_delay=0.1, job_pod_duration=0.1, pod_failure_backoff=0.2)
    emulator.allow_any_image()  # these tests are not about image pulls (those that are set their own resolver)
    for namespace in NAMESPACES:
        emulator.create("namespaces", None, {"metadata": {"name": namespace}})
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def tool_home(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tool-home")


@pytest.fixture(scope="module")
def kubeconfig(emu, tool_home) -> pathlib.Path:
    return emu.write_kubeconfig(tool_home / "kubeconfig")


@pytest.fixture(autouse=True)
def _reset_emulator_hooks(emu):
    yield
    emu.clear_pod_behaviours()
    emu.clear_faults()


def run_tool(binary: pathlib.Path, *args: str, kubeconfig: pathlib.Path, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
    if not binary.exists():
        pytest.skip(f"{binary} is not installed")
    home = kubeconfig.parent
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(home),
           "HELM_CACHE_HOME": str(home / "helm-cache"), "HELM_CONFIG_HOME": str(home / "helm-config"),
           "HELM_DATA_HOME": str(home / "helm-data")}
    result = subprocess.run([str(binary), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{binary.name} {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def kubectl(*args: str, kubeconfig: pathlib.Path, **kw) -> subprocess.CompletedProcess:
    return run_tool(KUBECTL, *args, kubeconfig=kubeconfig, **kw)


def helm(*args: str, kubeconfig: pathlib.Path, **kw) -> subprocess.CompletedProcess:
    return run_tool(HELM, *args, kubeconfig=kubeconfig, **kw)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def deployment_image(emu: KubeEmulator, namespace: str, name: str) -> str:
    deployment = emu.get("deployments", namespace, name)
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def job_body(name: str, **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "main", "image": "busybox:1.36"}]}},
                     **spec}}


def condition_types(obj: dict) -> list[str]:
    return [c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c["status"] == "True"]


WEB_MANIFEST = textwrap.dedent("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
      labels: {app: web}
    spec:
      replicas: 2
      selector:
        matchLabels: {app: web}
      template:
        metadata:
          labels: {app: web}
        spec:
          containers:
          - name: web
            image: nginx:1.27
            ports: [{containerPort: 80}]
    ---
    apiVersion: v1
    kind: Service
    metadata:
      name: web
    spec:
      selector: {app: web}
      ports: [{port: 80, targetPort: 80}]
    """)


# ------------------------------------------------------------------------ kubectl


def test_kubectl_apply_get_and_rollout_status(emu, kubeconfig, tmp_path):
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB_MANIFEST)

    applied = kubectl("apply", "-n", "web", "-f", str(manifest), kubeconfig=kubeconfig)
    assert "deployment.apps/web created" in applied.stdout
    got = json.loads(kubectl("get", "-n", "web", "deployment/web", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert got["spec"]["replicas"] == 2
    kubectl("rollout", "status", "-n", "web", "deployment/web", "--timeout=20s", kubeconfig=kubeconfig)

    deployment = emu.get("deployments", "web", "web")
    assert deployment["status"]["readyReplicas"] == 2
    assert {"Available", "Progressing"} <= set(condition_types(deployment))
    assert emu.get("services", "web", "web")["spec"]["clusterIP"]
    pods = emu.list("pods", "web", label_selector="app=web")
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)


def test_kubectl_reapply_changes_the_template(emu, kubeconfig, tmp_path):
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB_MANIFEST.replace("name: web\n", "name: web2\n", 1))
    kubectl("apply", "-n", "reapply", "-f", str(manifest), kubeconfig=kubeconfig)
    kubectl("rollout", "status", "-n", "reapply", "deployment/web2", "--timeout=20s", kubeconfig=kubeconfig)

    manifest.write_text(manifest.read_text().replace("nginx:1.27", "nginx:1.28"))
    kubectl("apply", "-n", "reapply", "-f", str(manifest), kubeconfig=kubeconfig)
    kubectl("rollout", "status", "-n", "reapply", "deployment/web2", "--timeout=20s", kubeconfig=kubeconfig)

    assert deployment_image(emu, "reapply", "web2") == "nginx:1.28"
    assert emu.get("deployments", "reapply", "web2")["metadata"]["generation"] == 2
    images = {p["spec"]["containers"][0]["image"] for p in emu.list("pods", "reapply")}
    assert images == {"nginx:1.28"}, "the old ReplicaSet's pods must be gone once the new ones are ready"


def test_kubectl_wait_for_job_complete_then_delete_removes_pods(emu, kubeconfig, tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(json.dumps(job_body("y")))

    kubectl("apply", "-n", "jobs", "-f", str(manifest), kubeconfig=kubeconfig)
    kubectl("wait", "-n", "jobs", "--for=condition=complete", "job/y", "--timeout=20s", kubeconfig=kubeconfig)

    job = emu.get("jobs", "jobs", "y")
    assert condition_types(job) == ["SuccessCriteriaMet", "Complete"]
    assert job["status"]["succeeded"] == 1 and job["status"]["completionTime"]
    [pod] = emu.list("pods", "jobs", label_selector="job-name=y")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    kubectl("delete", "-n", "jobs", "job", "y", kubeconfig=kubeconfig)
    assert emu.get("jobs", "jobs", "y") is None
    assert emu.list("pods", "jobs", label_selector="job-name=y") == []


def test_kubectl_create_secret_generic(emu, kubeconfig):
    kubectl("create", "secret", "generic", "creds", "-n", "secrets", "--from-literal=token=s3cret",
            kubeconfig=kubeconfig)

    secret = emu.get("secrets", "secrets", "creds")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    assert secret["type"] == "Opaque"
    [create] = [r for r in emu.requests if r.verb == "create" and r.resource == "secrets"
                and r.namespace == "secrets"]
    assert create.status == 201


# ------------------------------------------------------------------------ helm


@pytest.fixture(scope="module")
def chart(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("chart") / "demo"
    (root / "templates").mkdir(parents=True)
    (root / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\nappVersion: '1.0'\n")
    (root / "values.yaml").write_text("image:\n  repository: registry.local/demo\n  tag: '1.0'\n")
    (root / "templates" / "deployment.yaml").write_text(textwrap.dedent("""\
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {{ .Release.Name }}-demo
          labels: {app: {{ .Release.Name }}-demo}
        spec:
          replicas: 1
          selector:
            matchLabels: {app: {{ .Release.Name }}-demo}
          template:
            metadata:
              labels: {app: {{ .Release.Name }}-demo}
            spec:
              containers:
                - name: app
                  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
                  ports: [{containerPort: 8080}]
        """))
    (root / "templates" / "service.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata:
          name: {{ .Release.Name }}-demo
        spec:
          selector: {app: {{ .Release.Name }}-demo}
          ports: [{port: 80, targetPort: 8080}]
        """))
    return root


def helm_upgrade(chart: pathlib.Path, kubeconfig: pathlib.Path, namespace: str, tag: str, *extra: str,
                 check: bool = True) -> subprocess.CompletedProcess:
    return helm("upgrade", "--install", "r", str(chart), "-n", namespace, "--create-namespace", "--wait",
                "--timeout", "30s", "--set", f"image.tag={tag}", *extra, kubeconfig=kubeconfig, check=check)


def helm_history(kubeconfig: pathlib.Path, namespace: str) -> list[dict]:
    return json.loads(helm("history", "r", "-n", namespace, "-o", "json", kubeconfig=kubeconfig).stdout)


def test_helm_install_then_upgrade(emu, kubeconfig, chart):
    installed = helm_upgrade(chart, kubeconfig, "apps", "1.0")
    assert "REVISION: 1" in installed.stdout
    assert deployment_image(emu, "apps", "r-demo") == "registry.local/demo:1.0"
    assert emu.get("namespaces", None, "apps") is not None

    upgraded = helm_upgrade(chart, kubeconfig, "apps", "2.0")
    assert "REVISION: 2" in upgraded.stdout
    assert deployment_image(emu, "apps", "r-demo") == "registry.local/demo:2.0"
    assert emu.get("deployments", "apps", "r-demo")["status"]["updatedReplicas"] == 1
    release_secrets = emu.list("secrets", "apps", label_selector="owner=helm,name=r")
    assert sorted(s["metadata"]["labels"]["version"] for s in release_secrets) == ["1", "2"]


def test_helm_failed_upgrade_rolls_back(emu, kubeconfig, chart):
    helm_upgrade(chart, kubeconfig, "rollback", "1.0")
    emu.on_pod(lambda pod: pod["spec"]["containers"][0]["image"].endswith(":broken"),
               lambda pod: pod.waiting("ImagePullBackOff", 'Back-off pulling image "registry.local/demo:broken"'))

    started = time.monotonic()
    failed = helm("upgrade", "--install", "r", str(chart), "-n", "rollback", "--wait", "--timeout", "5s",
                  "--rollback-on-failure", "--set", "image.tag=broken", kubeconfig=kubeconfig, check=False)
    assert failed.returncode != 0, failed.stdout
    assert time.monotonic() - started < 20

    history = helm_history(kubeconfig, "rollback")
    assert [h["status"] for h in history] == ["superseded", "failed", "deployed"]
    assert deployment_image(emu, "rollback", "r-demo") == "registry.local/demo:1.0"
    wait_until(lambda: "NewReplicaSetAvailable" in json.dumps(emu.get("deployments", "rollback", "r-demo")))
    images = {p["spec"]["containers"][0]["image"] for p in emu.list("pods", "rollback")}
    assert images == {"registry.local/demo:1.0"}


def test_helm_rollback_to_revision_one(emu, kubeconfig, chart):
    helm_upgrade(chart, kubeconfig, "manual", "1.0")
    helm_upgrade(chart, kubeconfig, "manual", "2.0")

    helm("rollback", "r", "1", "-n", "manual", "--wait", "--timeout", "30s", kubeconfig=kubeconfig)

    history = helm_history(kubeconfig, "manual")
    assert [h["revision"] for h in history] == [1, 2, 3]
    assert history[-1]["status"] == "deployed" and "Rollback to 1" in history[-1]["description"]
    assert deployment_image(emu, "manual", "r-demo") == "registry.local/demo:1.0"


# ------------------------------------------------------------------------ kubernetes_asyncio


def run_async(coroutine_fn, kubeconfig: pathlib.Path):
    async def main():
        loader_config = client.Configuration()
        await config.load_kube_config(config_file=str(kubeconfig), client_configuration=loader_config)
        async with client.ApiClient(loader_config) as api:
            return await coroutine_fn(api)
    return asyncio.run(main())


def test_watchers_that_leave_at_once_leave_no_watch_behind(emu):
    """A client that closes its connection right after asking (even before the headers) ends its watch: the
    API server's watch ends with its request's context (k8s.io/apiserver pkg/endpoints/handlers/watch.go)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(emu.url)
    listeners = len(emu.store._listeners)
    for _ in range(30):
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            sock.sendall(b"GET /api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: len(emu.store._listeners) == listeners and not emu._server.open_watches, 10)


def test_the_seeded_node_reads_as_a_node_model_of_the_official_client(emu, kubeconfig):
    """kubernetes_asyncio's V1NodeSystemInfo refuses a node without every field the kubelet fills."""
    nodes = run_async(lambda api: client.CoreV1Api(api).list_node(), kubeconfig)
    [node] = nodes.items
    assert node.status.node_info.architecture == "amd64" and node.status.node_info.boot_id


def test_async_client_watches_job_to_completion(emu, kubeconfig):
    async def scenario(api):
        batch = client.BatchV1Api(api)
        created = await batch.create_namespaced_job("async", job_body("watched"))
        stream = watch.Watch().stream(batch.list_namespaced_job, "async",
                                      field_selector="metadata.name=watched",
                                      resource_version=created.metadata.resource_version, timeout_seconds=10)
        async with stream as events:
            async for event in events:
                conditions = event["object"].status.conditions or []
                if any(c.type == "Complete" and c.status == "True" for c in conditions):
                    break
        pods = await client.CoreV1Api(api).list_namespaced_pod("async", label_selector="job-name=watched")
        return event, pods

    event, pods = run_async(scenario, kubeconfig)
    assert event["type"] == "MODIFIED"
    assert event["object"].metadata.name == "watched"
    [pod] = pods.items
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_async_watch_resumes_after_drop(emu, kubeconfig):
    async def scenario(api):
        core = client.CoreV1Api(api)
        listing = await core.list_namespaced_config_map("resume")
        seen: list[str] = []
        stream = watch.Watch().stream(core.list_namespaced_config_map, "resume",
                                      resource_version=listing.metadata.resource_version)
        async with stream as events:
            await core.create_namespaced_config_map("resume", {"metadata": {"name": "before"}})
            async for event in events:
                seen.append(event["object"].metadata.name)
                if len(seen) == 1:
                    emu.drop_watches()
                    emu.create("configmaps", "resume", {"metadata": {"name": "during"}})
                if len(seen) == 2:
                    break
        return seen

    assert run_async(scenario, kubeconfig) == ["before", "during"]
    watches = [r for r in emu.requests if r.verb == "watch" and r.namespace == "resume"]
    assert len(watches) == 2 and watches[1].query["resourceVersion"] != watches[0].query["resourceVersion"]


def test_async_watch_from_expired_version_gets_410(emu, kubeconfig):
    async def scenario(api):
        core = client.CoreV1Api(api)
        listing = await core.list_namespaced_secret("expired")
        await core.create_namespaced_secret("expired", {"metadata": {"name": "s"}, "stringData": {"a": "b"}})
        emu.expire_history()
        stream = watch.Watch().stream(core.list_namespaced_secret, "expired",
                                      resource_version=listing.metadata.resource_version, timeout_seconds=5)
        with pytest.raises(ApiException) as caught:
            async with stream as events:
                async for _ in events:
                    pass
        return caught.value

    assert run_async(scenario, kubeconfig).status == 410


def test_raw_watch_after_expiry_is_an_error_event(emu):
    rv = emu.list("configmaps", "raw")  # nothing yet; take the server's version from a list call
    with urllib.request.urlopen(f"{emu.url}/api/v1/namespaces/raw/configmaps") as response:
        rv = json.load(response)["metadata"]["resourceVersion"]
    emu.create("configmaps", "raw", {"metadata": {"name": "c"}})
    emu.expire_history()
    url = f"{emu.url}/api/v1/namespaces/raw/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=2"
    with urllib.request.urlopen(url) as response:
        assert response.headers["Content-Type"] == "application/json"
        event = json.loads(response.readline())
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


# ------------------------------------------------------------------------ faults


def test_inject_fault_then_success(emu, kubeconfig):
    emu.inject_fault("POST", r"/namespaces/faults/configmaps$", 500)

    async def scenario(api):
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as first:
            await core.create_namespaced_config_map("faults", {"metadata": {"name": "c1"}})
        second = await core.create_namespaced_config_map("faults", {"metadata": {"name": "c1"}})
        return first.value, second

    error, created = run_async(scenario, kubeconfig)
    assert error.status == 500 and json.loads(error.body)["kind"] == "Status"
    assert created.metadata.name == "c1"
    assert [r.status for r in emu.requests if r.path.endswith("/namespaces/faults/configmaps")] == [500, 201]


def test_inject_fault_after_performs_the_request(emu, kubeconfig):
    emu.inject_fault("post", r"/namespaces/lost/configmaps", 500, after=True)

    async def scenario(api):
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as lost:
            await core.create_namespaced_config_map("lost", {"metadata": {"name": "c"}})
        with pytest.raises(ApiException) as duplicate:
            await core.create_namespaced_config_map("lost", {"metadata": {"name": "c"}})
        return lost.value, duplicate.value

    lost, duplicate = run_async(scenario, kubeconfig)
    assert lost.status == 500
    assert duplicate.status == 409 and json.loads(duplicate.body)["reason"] == "AlreadyExists"
    assert emu.get("configmaps", "lost", "c") is not None


# ------------------------------------------------------------------------ API semantics


def http(emu: KubeEmulator, method: str, path: str, body: dict | list | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(emu.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_missing_object_is_a_404_status(emu):
    code, body = http(emu, "GET", "/apis/batch/v1/namespaces/nowhere/jobs/ghost")
    assert code == 404
    assert body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == 'jobs.batch "ghost" not found'


def test_put_with_stale_resource_version_conflicts(emu):
    created = emu.create("configmaps", "put", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    path = "/api/v1/namespaces/put/configmaps/cm"
    code, updated = http(emu, "PUT", path, {**created, "data": {"a": "2"}})
    assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    code, body = http(emu, "PUT", path, {**created, "data": {"a": "3"}})
    assert code == 409 and body["reason"] == "Conflict"
    assert emu.get("configmaps", "put", "cm")["data"] == {"a": "2"}


def test_status_subresource_and_generation(emu):
    emu.create("deployments", "gen", {"metadata": {"name": "d"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}},
        "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}})
    path = "/apis/apps/v1/namespaces/gen/deployments/d"
    code, patched = http(emu, "PATCH", path, {"spec": {"template": {"spec": {"containers": [
        {"name": "c", "image": "x:2"}]}}}, "status": {"replicas": 99}},
        content_type="application/strategic-merge-patch+json")
    assert code == 200
    assert patched["metadata"]["generation"] == 2
    assert (patched.get("status") or {}).get("replicas") != 99, "status changes through the main resource are ignored"
    code, patched = http(emu, "PATCH", path + "/status", {"metadata": {"labels": {"x": "y"}}, "status": {"foo": 1}},
                         content_type="application/merge-patch+json")
    assert code == 200 and patched["status"]["foo"] == 1 and "x" not in (patched["metadata"].get("labels") or {})


def test_json_patch_and_label_and_field_selectors(emu):
    for name, tier in (("a", "web"), ("b", "db"), ("c", "web")):
        emu.create("configmaps", "sel", {"metadata": {"name": name, "labels": {"tier": tier}}})
    code, _ = http(emu, "PATCH", "/api/v1/namespaces/sel/configmaps/c",
                   [{"op": "add", "path": "/metadata/labels/tier", "value": "cache"}],
                   content_type="application/json-patch+json")
    assert code == 200
    code, listing = http(emu, "GET", "/api/v1/namespaces/sel/configmaps?labelSelector=tier%20in%20(web,cache)")
    assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
    assert sorted(i["metadata"]["name"] for i in listing["items"]) == ["a", "c"]
    code, listing = http(emu, "GET", "/api/v1/configmaps?fieldSelector=metadata.name%3Db")
    assert [i["metadata"]["name"] for i in listing["items"]] == ["b"]


def test_generate_name_and_namespace_objects(emu):
    code, ns = http(emu, "POST", "/api/v1/namespaces", {"metadata": {"name": "made"}})
    assert code == 201 and ns["status"]["phase"] == "Active"
    code, pod = http(emu, "POST", "/api/v1/namespaces/made/configmaps", {"metadata": {"generateName": "gen-"}})
    assert code == 201 and pod["metadata"]["name"].startswith("gen-") and len(pod["metadata"]["name"]) == 9
    code, body = http(emu, "POST", "/api/v1/namespaces", {"metadata": {"name": "made"}})
    assert code == 409 and body["reason"] == "AlreadyExists"


def test_deleting_an_owner_deletes_its_dependents(emu):
    job = emu.create("jobs", "gc", job_body("owner", suspend=True))
    reference = {"apiVersion": "batch/v1", "kind": "Job", "name": "owner", "uid": job["metadata"]["uid"]}
    emu.create("secrets", "gc", {"metadata": {"name": "registry", "ownerReferences": [reference]}})
    emu.create("secrets", "gc", {"metadata": {"name": "kept"}})
    code, _ = http(emu, "DELETE", "/apis/batch/v1/namespaces/gc/jobs/owner?propagationPolicy=Foreground")
    assert code == 200
    assert emu.get("secrets", "gc", "registry") is None
    assert emu.get("secrets", "gc", "kept") is not None


def test_server_side_apply_creates_then_prunes_dropped_fields(emu):
    path = "/api/v1/namespaces/ssa/configmaps/applied?fieldManager=tool&force=true"
    first = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"a": "1", "b": "2"}}
    code, _ = http(emu, "PATCH", path, first, content_type="application/apply-patch+yaml")
    assert code == 201
    code, second = http(emu, "PATCH", path, {**first, "data": {"a": "1"}}, content_type="application/apply-patch+yaml")
    assert code == 200 and second["data"] == {"a": "1"}


def test_strategic_merge_merges_containers_by_name():
    live = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                      "containers": [{"name": "b", "image": "2"}]}}
    merged = patching.strategic_merge(live, patch)
    assert merged["spec"]["containers"] == [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]


def test_protobuf_secret_decodes():
    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    entry = field(1, b"token") + field(2, b"\x00\xff")
    meta = field(1, b"s") + field(3, b"ns") + field(11, field(1, b"owner") + field(2, b"helm"))
    secret = field(1, meta) + field(2, entry) + field(3, b"Opaque")
    envelope = field(1, field(1, b"v1") + field(2, b"Secret")) + field(2, secret)
    decoded = protobuf.decode_object(protobuf.MAGIC + envelope)
    assert decoded == {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                       "metadata": {"name": "s", "namespace": "ns", "labels": {"owner": "helm"}},
                       "data": {"token": base64.b64encode(b"\x00\xff").decode()}}


# ------------------------------------------------------------------------ controllers and pods


def test_job_retries_then_fails_with_backoff_limit(emu):
    emu.on_pod(lambda pod: pod["metadata"]["namespace"] == "backoff", lambda pod: pod.terminate(1, message="boom"))
    emu.create("jobs", "backoff", job_body("flaky", backoffLimit=1))
    job = wait_until(lambda: "Failed" in condition_types(emu.get("jobs", "backoff", "flaky"))
                     and emu.get("jobs", "backoff", "flaky"))
    assert condition_types(job) == ["FailureTarget", "Failed"]
    assert job["status"]["conditions"][-1]["reason"] == "BackoffLimitExceeded"
    assert job["status"]["failed"] == 2
    pods = emu.list("pods", "backoff")
    assert len(pods) == 2
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 1 and terminated["message"] == "boom" and terminated["reason"] == "Error"


def test_job_deadline_exceeded_deletes_pods(emu):
    emu.on_pod(lambda pod: pod["metadata"]["namespace"] == "deadline", PodHandle.running)
    emu.create("jobs", "deadline", job_body("slow", activeDeadlineSeconds=1))
    job = wait_until(lambda: "Failed" in condition_types(emu.get("jobs", "deadline", "slow"))
                     and emu.get("jobs", "deadline", "slow"))
    assert job["status"]["conditions"][-1]["reason"] == "DeadlineExceeded"
    assert emu.list("pods", "deadline") == []


def test_pod_logs_follow_until_the_pod_terminates(emu):
    release = threading.Event()

    def behaviour(pod: PodHandle) -> None:
        pod.running()
        pod.log("step 1")
        release.wait(5)
        pod.log("step 2")
        pod.terminate(0)

    emu.on_pod(lambda pod: pod["metadata"]["namespace"] == "logs", behaviour)
    emu.create("pods", "logs", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    wait_until(lambda: emu.get("pods", "logs", "p")["status"]["phase"] == "Running")
    with urllib.request.urlopen(f"{emu.url}/api/v1/namespaces/logs/pods/p/log?follow=true") as response:
        assert response.readline() == b"step 1\n"
        release.set()
        assert response.read() == b"step 2\n"
    with urllib.request.urlopen(f"{emu.url}/api/v1/namespaces/logs/pods/p/log?tailLines=1") as response:
        assert response.read() == b"step 2\n"


# ------------------------------------------------------------------------ scheduler, kubelet, admission, disruption


def events_of(emu, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(e["reason"], e["message"]) for e in emu.list("events", namespace)
            if e["involvedObject"]["name"] == name]


def pod_of(emu, namespace: str, job: str) -> dict | None:
    pods = emu.list("pods", namespace, label_selector=f"job-name={job}")
    return pods[-1] if pods else None


def test_an_unknown_image_waits_in_err_image_pull_then_image_pull_back_off(emu):
    emu.image_resolver = lambda image: image != "busybox:9.99"
    try:
        emu.create("pods", "pull", {"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "busybox:9.99"}]}})
        wait_until(lambda: (emu.get("pods", "pull", "p")["status"].get("containerStatuses") or [{}])[0]
                   .get("state", {}).get("waiting", {}).get("reason") == "ImagePullBackOff", timeout=5)
        pod = emu.get("pods", "pull", "p")
        assert pod["status"]["phase"] == "Pending"
        ref = "docker.io/library/busybox:9.99"
        assert ("Failed", f'Failed to pull image "busybox:9.99": rpc error: code = NotFound desc = failed to pull and '
                          f'unpack image "{ref}": failed to resolve reference "{ref}": {ref}: not found') \
            in events_of(emu, "pull", "p")
        assert ("Failed", "Error: ErrImagePull") in events_of(emu, "pull", "p")
        assert ("BackOff", 'Back-off pulling image "busybox:9.99"') in events_of(emu, "pull", "p")
    finally:
        emu.allow_any_image()


def test_a_pod_no_node_fits_stays_pending_unschedulable(emu):
    emu.create("pods", "sched", {"metadata": {"name": "p"}, "spec": {
        "nodeSelector": {"kubernetes.io/arch": "arm64"}, "containers": [{"name": "c", "image": "x:1"}]}})
    message = ("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: "
               "0/1 nodes are available: 1 Preemption is not helpful for scheduling.")
    pod = wait_until(lambda: emu.get("pods", "sched", "p")["status"].get("conditions") and emu.get("pods", "sched", "p"))
    assert pod["status"]["conditions"][0] | {"lastTransitionTime": None} == {
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastProbeTime": None, "lastTransitionTime": None}
    assert "nodeName" not in pod["spec"]
    assert ("FailedScheduling", message) in events_of(emu, "sched", "p")
    emu.create("pods", "sched", {"metadata": {"name": "big"}, "spec": {"containers": [
        {"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "64"}}}]}})
    wait_until(lambda: events_of(emu, "sched", "big"))
    assert events_of(emu, "sched", "big")[0][1].startswith("0/1 nodes are available: 1 Insufficient cpu. ")


def test_pod_security_baseline_refuses_a_privileged_pod_and_the_job_records_failed_create(emu):
    emu.create("namespaces", None, {"metadata": {"name": "psa", "labels": {
        "pod-security.kubernetes.io/enforce": "baseline"}}})
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "buildkit", "image": "x:1", "securityContext": {"privileged": True}}]}}
    request = urllib.request.Request(f"{emu.url}/api/v1/namespaces/psa/pods", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 403
    assert json.loads(refused.value.read())["message"] == (
        'pods "p" is forbidden: violates PodSecurity "baseline:latest": privileged '
        '(container "buildkit" must not set securityContext.privileged=true)')

    job = job_body("priv")
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {
        "seccompProfile": {"type": "Unconfined"}, "appArmorProfile": {"type": "Unconfined"}}
    emu.create("jobs", "psa", job)
    failed = wait_until(lambda: [m for r, m in events_of(emu, "psa", "priv") if r == "FailedCreate"])
    assert failed[0].startswith('Error creating: pods "priv-')
    assert failed[0].endswith('is forbidden: violates PodSecurity "baseline:latest": forbidden AppArmor profile '
                              '(container "main" must not set AppArmor profile type to "Unconfined"), seccompProfile '
                              '(container "main" must not set securityContext.seccompProfile.type to "Unconfined")')
    assert emu.list("pods", "psa") == []


def test_a_missing_secret_makes_the_pod_wait_until_it_exists(emu):
    emu.create("pods", "secrets", {"metadata": {"name": "env"}, "spec": {"containers": [{
        "name": "c", "image": "x:1", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}})
    emu.create("pods", "secrets", {"metadata": {"name": "vol"}, "spec": {
        "volumes": [{"name": "cfg", "secret": {"secretName": "s"}}], "containers": [{"name": "c", "image": "x:1"}]}})

    def waiting(name: str) -> dict:
        statuses = emu.get("pods", "secrets", name)["status"].get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting", {})

    wait_until(lambda: waiting("env").get("reason") == "CreateContainerConfigError")
    assert waiting("env")["message"] == 'secret "s" not found'
    wait_until(lambda: waiting("vol").get("reason") == "ContainerCreating")
    assert ("FailedMount", 'MountVolume.SetUp failed for volume "cfg" : secret "s" not found') \
        in events_of(emu, "secrets", "vol")
    emu.create("secrets", "secrets", {"metadata": {"name": "s"}, "data": {"k": "dg=="}})
    for name in ("env", "vol"):
        wait_until(lambda n=name: emu.get("pods", "secrets", n)["status"]["phase"] == "Succeeded")


def test_an_evicted_pod_is_replaced_under_the_pod_failure_policy_and_a_failed_one_is_not(emu):
    release = threading.Event()

    def behaviour(pod: PodHandle) -> None:
        pod.running()
        release.wait(5)
        pod.terminate(0 if pod.name.startswith("evict-") else 1)

    emu.on_pod(lambda pod: pod["metadata"]["namespace"] == "disrupt", behaviour)
    policy = {"rules": [
        {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "NotIn", "values": [0]}}]}
    emu.create("jobs", "disrupt", job_body("evict", backoffLimit=1, podFailurePolicy=policy))
    first = wait_until(lambda: (p := pod_of(emu, "disrupt", "evict")) and p["status"].get("phase") == "Running" and p)
    request = urllib.request.Request(
        f"{emu.url}/api/v1/namespaces/disrupt/pods/{first['metadata']['name']}/eviction", method="POST",
        data=json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                         "metadata": {"name": first["metadata"]["name"]}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 201
    evicted = emu.get("pods", "disrupt", first["metadata"]["name"])
    assert evicted["metadata"]["deletionTimestamp"]
    assert {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting"}.items() <= evicted["status"]["conditions"][-1].items()
    second = wait_until(lambda: (p := pod_of(emu, "disrupt", "evict")) and p["metadata"]["name"]
                        != first["metadata"]["name"] and p)
    release.set()
    job = wait_until(lambda: "Complete" in condition_types(emu.get("jobs", "disrupt", "evict"))
                     and emu.get("jobs", "disrupt", "evict"))
    assert job["status"]["failed"] == 1 and job["status"]["succeeded"] == 1
    assert emu.get("pods", "disrupt", second["metadata"]["name"])["status"]["phase"] == "Succeeded"

    emu.create("jobs", "disrupt", job_body("fails", backoffLimit=1, podFailurePolicy=policy))
    job = wait_until(lambda: "Failed" in condition_types(emu.get("jobs", "disrupt", "fails"))
                     and emu.get("jobs", "disrupt", "fails"), timeout=10)
    assert job["status"]["conditions"][0]["reason"] == "PodFailurePolicy"
    assert "failed with exit code 1 matching FailJob rule at index 1" in job["status"]["conditions"][0]["message"]
    assert len(emu.list("pods", "disrupt", label_selector="job-name=fails")) == 1


def test_failure_target_comes_first_and_failed_only_once_the_pods_have_stopped(emu):
    emu.on_pod(lambda pod: pod["metadata"]["namespace"] == "gap", PodHandle.running)
    seen: list[list[str]] = []
    emu.store.subscribe(lambda event: seen.append(condition_types(event.obj))
                        if event.plural == "jobs" and event.obj["metadata"]["name"] == "gap" else None)
    emu.create("jobs", "gap", job_body("gap", activeDeadlineSeconds=1))
    wait_until(lambda: "Failed" in condition_types(emu.get("jobs", "gap", "gap")))
    interim = next(i for i, types in enumerate(seen) if "FailureTarget" in types)
    final = next(i for i, types in enumerate(seen) if "Failed" in types)
    assert interim < final and "Failed" not in seen[interim]
    assert emu.get("jobs", "gap", "gap")["status"]["terminating"] == 0


# ------------------------------------------------------------------------ NamespaceLifecycle admission


def test_content_in_a_missing_namespace_is_refused_with_the_api_servers_404(emu, kubeconfig):
    done = kubectl("create", "secret", "generic", "s", "-n", "absent", "--from-literal=a=b", kubeconfig=kubeconfig,
                   check=False)
    assert (done.returncode, done.stderr.strip()) == (1, 'error: failed to create secret namespaces "absent" not found')
    code, body = http(emu, "PATCH", "/api/v1/namespaces/absent/configmaps/c?fieldManager=t",
                      {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
                      content_type="application/apply-patch+yaml")
    assert (code, body["reason"], body["message"]) == (404, "NotFound", 'namespaces "absent" not found')
    assert body["details"]["kind"] == "namespaces" and body["details"]["name"] == "absent"
    assert emu.get("secrets", "absent", "s") is None and emu.get("configmaps", "absent", "c") is None


def test_a_terminating_namespace_takes_no_new_content_and_immortal_namespaces_stay(emu, kubeconfig):
    emu.create("namespaces", None, {"metadata": {"name": "closing", "finalizers": ["sandbox.test/hold"]}})
    emu.create("configmaps", "closing", {"metadata": {"name": "old"}})
    kubectl("delete", "namespace", "closing", "--wait=false", kubeconfig=kubeconfig)
    assert emu.get("namespaces", None, "closing")["status"]["phase"] == "Terminating"

    done = kubectl("create", "configmap", "new", "-n", "closing", kubeconfig=kubeconfig, check=False)
    assert (done.returncode, done.stderr.strip()) == (1, (
        'error: failed to create configmap: configmaps "new" is forbidden: unable to create new content in namespace '
        "closing because it is being terminated"))
    code, body = http(emu, "POST", "/api/v1/namespaces/closing/secrets", {"metadata": {"generateName": "g-"}})
    assert (code, body["reason"]) == (403, "Forbidden")
    assert body["message"] == ('secrets "g-" is forbidden: unable to create new content in namespace closing '
                               "because it is being terminated")
    assert body["details"]["causes"] == [{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                                          "message": "namespace closing is being terminated"}]
    kubectl("label", "configmap", "old", "-n", "closing", "still=updatable", kubeconfig=kubeconfig)
    kubectl("delete", "configmap", "old", "-n", "closing", kubeconfig=kubeconfig)

    done = kubectl("delete", "namespace", "default", kubeconfig=kubeconfig, check=False)
    assert (done.returncode, done.stderr.strip()) == (1, (
        'Error from server (Forbidden): namespaces "default" is forbidden: this namespace may not be deleted'))
    assert emu.get("namespaces", None, "default") is not None
