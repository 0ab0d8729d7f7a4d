"""Secrets stay out of everything a run leaves behind, and the flow's Kubernetes identity needs exactly the
Role in deployments/rbac.yaml.

The secrets of a run: the ECR token minted for the build, the presigned URL's signature, the values of
`release.set_secret` (Prefect Secret blocks) and of the build secrets. They may live where they are needed
(the build's Kubernetes Secrets, which hold the presigned URL too, and the helm release) and nowhere else: not in the run's
Prefect logs, its artifacts, its result, the texts of its errors, or any Python log record, with every
logger at DEBUG.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from urllib.request import urlopen

import kubernetes_validate
import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings

from flows.pipeline import build_and_deploy
from flows.results import PipelineFailed
from sandbox import ecr_auth
from sandbox.aws import BUILD_ROLE_ARN
from sandbox.example import commit_all
from tests.conftest import REPO_ROOT, ExampleApp, run_logs

MCP, AGENT = "weather-mcp", "weather-agent"
ACCOUNT = "123456789012"
REGISTRY = f"{ACCOUNT}.dkr.ecr.us-west-2.amazonaws.com"
MCP_REPOSITORY, AGENT_REPOSITORY = f"{REGISTRY}/agents-on-eks/weather-mcp", f"{REGISTRY}/agents-on-eks/weather-agent"
RBAC_FILE = REPO_ROOT / "deployments" / "rbac.yaml"
DEBUG_LOGGERS = ("", "prefect", "prefect._internal", "prefect.extra", "botocore", "boto3", "s3transfer", "urllib3",
                 "kubernetes_asyncio", "aiohttp", "httpx", "httpcore", "git")
NON_PROPAGATING = ("prefect._internal", "prefect.extra")
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


# ---------------------------------------------------------------- capture


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def debug_records():
    """Every Python log record from here on, with Prefect and the AWS, Kubernetes and HTTP clients at DEBUG, as
    PREFECT_LOGGING_LEVEL=DEBUG and a root logger at DEBUG would have them."""
    recorder = Recorder()
    loggers = {name: logging.getLogger(name) for name in DEBUG_LOGGERS}
    levels = {name: logger.level for name, logger in loggers.items()}
    for logger in loggers.values():
        logger.setLevel(logging.DEBUG)
    for name in ("", *NON_PROPAGATING):
        loggers[name].addHandler(recorder)
    yield recorder.records
    for name in ("", *NON_PROPAGATING):
        loggers[name].removeHandler(recorder)
    for name, level in levels.items():
        loggers[name].setLevel(level)


def flow_record_texts(records: list[logging.LogRecord]) -> list[str]:
    """The records the flow's process wrote, without the stand-ins' own.

    The simulated BuildKit pods run in threads named `pod-...` and mint a token
    themselves to check the mounted one; that is the registry's side, not ours.
    """
    texts = []
    for record in records:
        if record.threadName.startswith("pod-"):
            continue
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        texts.append(text + (record.stack_info or ""))
    return texts


def run_artifacts(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [artifact.model_dump_json() for artifact in artifacts]


def task_run_messages(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.state.message or "" for run in task_runs if run.state]


def exception_chain_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def stored_results() -> list[str]:
    """Every result Prefect persisted, decoded: the file, or the `result` of the JSON record in it, is base64 of
    a pickle, and a pickle holds strings as UTF-8."""
    texts = []
    for path in Path(PREFECT_LOCAL_STORAGE_PATH.value()).rglob("*"):
        if path.is_file():
            stored = path.read_bytes()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                stored = json.loads(stored)["result"].encode()
            with contextlib.suppress(ValueError):
                stored += base64.b64decode(stored)
            texts.append(stored.decode(errors="replace"))
    return texts


# ---------------------------------------------------------------- the secrets of a run


@dataclass
class RunSecrets:
    """Each secret of a run by a name for the failure message, in every spelling it could leak in."""

    values: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, value: str) -> None:
        self.values[name] = value
        self.values[f"{name} (base64)"] = base64.b64encode(value.encode()).decode()

    def found_in(self, where: str, texts: list[str]) -> list[str]:
        return [f"{name} in {where}" for name, value in self.values.items() if any(value in text for text in texts)]


@dataclass
class SecretApp:
    app: ExampleApp
    secrets: RunSecrets

    @property
    def build_namespace(self) -> str:
        return self.app.config.build.namespace


def release_namespace(app, component: str) -> str:
    return app.config.component(component).release.namespace


def render_db_password_into_the_mcp_deployment(root: Path) -> None:
    """What charts do with a secret value: the rollout check then reads it back from the cluster."""
    template = root / "manifests/helm/mcp/templates/deployment.yaml"
    text = template.read_text()
    anchor = "          imagePullPolicy: {{ .Values.image.pullPolicy }}\n"
    template.write_text(text.replace(anchor, anchor + "          env:\n            - name: DB_PASSWORD\n"
                                                      "              value: {{ .Values.db.password | quote }}\n"))


@pytest.fixture
def secret_app(prefect_server, sandbox, example_app) -> SecretApp:
    """The example app with a `set_secret` on weather-mcp, an AWS build secret on both components and a
    Kubernetes build secret on weather-mcp; each value unique to this test."""
    app, secrets = example_app, RunSecrets()
    build_namespace, mcp_namespace = app.config.build.namespace, release_namespace(app, MCP)
    secrets.add("set_secret value", f"set-secret-{uuid.uuid4().hex}")
    secrets.add("AWS build secret", f"aws-build-secret-{uuid.uuid4().hex}")
    secrets.add("Kubernetes build secret", f"kubernetes-build-secret-{uuid.uuid4().hex}")
    Secret(value=secrets.values["set_secret value"]).save(f"db-password-{mcp_namespace}", overwrite=True)
    arn = sandbox.aws.client("secretsmanager", app.config.aws.region).create_secret(
        Name=f"npmrc-{build_namespace}", SecretString=secrets.values["AWS build secret"])["ARN"]
    sandbox.kube.create("secrets", build_namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pip", "namespace": build_namespace},
        "data": {"token": secrets.values["Kubernetes build secret (base64)"]},
    })
    aws_secret = f"      - {{id: npmrc, aws_secrets_manager: '{arn}'}}\n"
    text = app.pipeline_file.read_text()
    text = text.replace("    image: agents-on-eks/weather-mcp\n", "    image: agents-on-eks/weather-mcp\n    secrets:\n"
                        "      - {id: pip-token, kubernetes: {name: pip, key: token}}\n" + aws_secret)
    text = text.replace("    image: agents-on-eks/weather-agent\n",
                        "    image: agents-on-eks/weather-agent\n    secrets:\n" + aws_secret)
    text = text.replace(f"namespace: {mcp_namespace}}}",
                        f"namespace: {mcp_namespace}, set_secret: {{db.password: db-password-{mcp_namespace}}}}}")
    app.pipeline_file.write_text(text)
    render_db_password_into_the_mcp_deployment(app.root)
    commit_all(app.root, "Secrets for the run")
    return SecretApp(app, secrets)


def tokens_issued_since(count: int) -> list[str]:
    """The ECR tokens the sandbox issued after the first `count` (each GetAuthorizationToken gives a new one)."""
    return ecr_auth.issued_tokens()[count:]


def build_sessions() -> list:
    """The STS sessions of the sandbox's build role (each build's token is minted by one)."""
    from moto.sts.models import sts_backends

    return [role for account in list(sts_backends) for partition in list(sts_backends[account])
            for role in sts_backends[account][partition].assumed_roles if role.role_arn == BUILD_ROLE_ARN]


def secrets_created(sandbox, namespace: str, since_resource_version: int) -> list[dict]:
    """Every Secret created in `namespace` since then, deleted or not, from the emulator's event history."""
    def ignore(event) -> None:
        pass

    history = sandbox.kube.store.subscribe(ignore, since_rv=since_resource_version)
    sandbox.kube.store.unsubscribe(ignore)
    return [event.obj for event in history if event.plural == "secrets" and event.type == "ADDED"
            and event.obj["metadata"].get("namespace") == namespace]


def run_jobs(sandbox, namespace: str, flow_run_id) -> list[dict]:
    return sandbox.kube.list("jobs", namespace, label_selector={"buildkit-pipeline/flow-run": str(flow_run_id)})


def context_url(sandbox, job: dict) -> str:
    """The presigned URL the Job's container gets in `CONTEXT_URL`: from the Secret its env names, as the emulator
    stored it (the Secret is deleted after the build, so from the event history)."""
    [container] = job["spec"]["template"]["spec"]["containers"]
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "CONTEXT_URL"]
    created = [s for s in secrets_created(sandbox, job["metadata"]["namespace"], sandbox.kube.store._oldest_valid_rv)
               if s["metadata"]["name"] == ref["name"]]
    assert created, f"no Secret {ref['name']} was created for {job['metadata']['name']}"
    return base64.b64decode(created[-1]["data"][ref["key"]]).decode()


def url_query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def add_run_secrets(secrets: RunSecrets, sandbox, app, state, since_resource_version: int) -> None:
    """Add what the run minted: the ECR tokens and passwords, the build sessions' keys, the registry Secrets and the
    URL signatures."""
    issued = set(ecr_auth.issued_tokens())
    created = secrets_created(sandbox, app.config.build.namespace, since_resource_version)
    registry_secrets = [s for s in created if s["type"] == "kubernetes.io/dockerconfigjson"]
    assert registry_secrets, "the run created no registry Secret"
    for secret in registry_secrets:
        name = secret["metadata"]["name"]
        token = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"][REGISTRY]["auth"]
        assert token in issued, "the flow pushed with a token the sandbox's ECR never issued"
        secrets.values.update({f"ECR token of {name}": token,
                               f"ECR password of {name}": base64.b64decode(token).decode().removeprefix("AWS:"),
                               f"registry Secret {name}": secret["data"][".dockerconfigjson"]})
    for session in build_sessions():
        secrets.values[f"secret key of build session {session.session_name}"] = session.secret_access_key
        secrets.values[f"session token of build session {session.session_name}"] = session.session_token
    jobs = run_jobs(sandbox, app.config.build.namespace, state.state_details.flow_run_id)
    assert jobs, "the run left no build Job to read its context URL from"
    for job in jobs:
        secrets.values[f"signature of {job['metadata']['name']}'s URL"] = url_query(context_url(sandbox, job))["X-Amz-Signature"]


def flow_secrets_left(sandbox, namespace: str) -> list[str]:
    return [s["metadata"]["name"] for s in sandbox.kube.list("secrets", namespace)
            if "buildkit-pipeline/flow-run" in (s["metadata"].get("labels") or {})]


# ---------------------------------------------------------------- A: secrets


def test_a_successful_run_at_debug_level_keeps_every_secret_to_where_it_is_needed(
    sandbox, secret_app, debug_records
):
    app, secrets = secret_app.app, secret_app.secrets
    since, first_record = sandbox.kube.store.resource_version, len(debug_records)

    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}):
        state = app.run()
    logged = flow_record_texts(debug_records[first_record:])
    result = state.result()

    add_run_secrets(secrets, sandbox, app, state, since)
    flow_run_id = state.state_details.flow_run_id
    deployed = sandbox.kube.get("deployments", release_namespace(app, MCP), MCP)
    assert json.dumps(deployed).count(secrets.values["set_secret value"]) == 1, "the chart got the value"
    leaks = (secrets.found_in("the run's Prefect logs", run_logs(flow_run_id))
             + secrets.found_in("the run's artifacts", run_artifacts(flow_run_id))
             + secrets.found_in("the flow result", [result.model_dump_json()])
             + secrets.found_in("the task runs' state messages", task_run_messages(flow_run_id))
             + secrets.found_in("persisted results", stored_results())
             + secrets.found_in("Python log records", logged))
    assert not leaks, "\n".join(leaks)
    assert flow_secrets_left(sandbox, secret_app.build_namespace) == []


def test_a_failed_run_keeps_every_secret_out_of_its_errors_and_logs(sandbox, secret_app, debug_records):
    app, secrets = secret_app.app, secret_app.secrets
    since, first_record = sandbox.kube.store.resource_version, len(debug_records)
    sandbox.buildkit.failures[AGENT_REPOSITORY] = 'process "/bin/sh -c pip install -r requirements.txt" ' \
                                                  "did not complete successfully: exit code: 1"
    try:
        state = app.run()
    finally:
        sandbox.buildkit.failures.pop(AGENT_REPOSITORY, None)
    logged = flow_record_texts(debug_records[first_record:])

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, PipelineFailed) and f"{AGENT}: BuildFailed" in str(error)
    assert f"{MCP}: " not in str(error), "weather-mcp, with the set_secret, must deploy in the failing run"
    add_run_secrets(secrets, sandbox, app, state, since)
    flow_run_id = state.state_details.flow_run_id
    leaks = (secrets.found_in("the state message", [state.message or ""])
             + secrets.found_in("the exception chain", [exception_chain_text(error)])
             + secrets.found_in("the task runs' state messages", task_run_messages(flow_run_id))
             + secrets.found_in("the run's Prefect logs", run_logs(flow_run_id))
             + secrets.found_in("the run's artifacts", run_artifacts(flow_run_id))
             + secrets.found_in("Python log records", logged))
    assert not leaks, "\n".join(leaks)
    assert flow_secrets_left(sandbox, secret_app.build_namespace) == []


def test_the_context_url_lives_exactly_presign_ttl_seconds(prefect_server, sandbox, example_app):
    """moto does not check presigned URLs at all (a SigV4 URL still works after X-Amz-Date + X-Amz-Expires,
    and with a changed signature), so the lifetime is checked as the URL states it, which is what S3 enforces:
    signed during the run, valid for exactly the configured seconds, and still valid when its Job was created."""
    app = example_app
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace("prefix: build/}",
                                                                       "prefix: build/, presign_ttl_seconds: 60}"))
    commit_all(app.root, "A one-minute context URL")
    before = datetime.now(timezone.utc).replace(microsecond=0)

    state = app.run(components=[MCP], deploy=False)
    [mcp] = state.result().components

    [job] = run_jobs(sandbox, app.config.build.namespace, state.state_details.flow_run_id)
    url = context_url(sandbox, job)
    query = url_query(url)
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    expires = signed + timedelta(seconds=int(query["X-Amz-Expires"]))
    job_created = datetime.fromisoformat(job["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
    assert expires - signed == timedelta(seconds=60)
    assert before <= signed <= job_created < expires
    with urlopen(url, timeout=10) as response:
        assert hashlib.sha256(response.read()).hexdigest() == mcp.archive_sha256


def test_the_registry_token_is_never_a_persisted_result_whatever_the_settings_and_cache_say(
    prefect_server, sandbox, example_app, tmp_path
):
    """PREFECT_RESULTS_PERSIST_BY_DEFAULT=true, and the stage given a cache key as someone tuning it might:
    Prefect then writes a task's result under that key (prefect/transactions.py, `commit`, 3.9.1), so only the
    task's own `persist_result=False` keeps the token out of result storage."""
    from prefect import flow

    from flows import tasks

    app = example_app
    keyed = tasks.mint_registry_token.with_options(cache_key_fn=lambda context, parameters: "registry-auth-probe")

    @flow
    async def mint() -> str:
        return (await keyed(app.flow_kwargs["aws_credentials"], app.config.registry)).registry

    secrets, before = RunSecrets(), len(ecr_auth.issued_tokens())
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True, PREFECT_LOCAL_STORAGE_PATH: tmp_path}):
        assert asyncio.run(mint()) == app.config.registry
        stored = stored_results()
    [token] = tokens_issued_since(before)
    secrets.add("ECR token", token)
    assert stored, "the flow's own result was persisted, so the setting took effect"
    leaks = secrets.found_in("persisted results", stored)
    assert not leaks, "\n".join(leaks)


# ---------------------------------------------------------------- B: RBAC


def role_rules() -> set[tuple[str, str, str]]:
    [role] = [d for d in yaml.safe_load_all(RBAC_FILE.read_text()) if d["kind"] == "Role"]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def permissions_used(records, namespace: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) of every request in `namespace`, the emulator's verb being
    Kubernetes' own: GET item get, GET collection list, watch=true watch, POST create, PUT update, PATCH
    patch, DELETE item delete, DELETE collection deletecollection."""
    return {(r.group, r.resource + (f"/{r.subresource}" if r.subresource else ""), r.verb)
            for r in records if r.namespace == namespace}


def cancel_once_the_job_exists(sandbox, app, first_request: int, **params) -> None:
    """Start a run and cancel its asyncio task once its build Job exists: the build deletes the Job, and the run,
    Crashed, cleans up the rest through its on_crashed hook."""
    def job_created() -> bool:
        return any(r.resource == "jobs" and r.verb == "create" and r.status == 201
                   for r in sandbox.kube.requests[first_request:])

    async def start_then_cancel() -> None:
        run = asyncio.create_task(build_and_deploy(config=str(app.pipeline_file), **params))
        while not job_created() and not run.done():
            await asyncio.sleep(0.05)
        run.cancel()
        with contextlib.suppress(BaseException):
            await run

    with app.connected():
        asyncio.run(start_then_cancel())


def test_the_role_grants_exactly_what_the_flow_uses_in_the_build_namespace(prefect_server, sandbox, example_app):
    """Every request in the build namespace is the flow's: helm and the flow's rollout check work in the release
    namespaces (and helm at cluster scope: discovery, namespaces), so a request's namespace tells them apart.
    The emulator's controllers and the simulated BuildKit pods change the emulator's store directly, never over
    HTTP, so none of their work is in the request log.

    Two runs take every path the flow has there: one where a Secret and a Job create meet their own earlier
    create (409, the answer lost), the Job watch meets 410 Gone and one build fails (its events are read), and
    one cancelled while building (the Job is deleted, the run's leftovers listed and deleted).
    """
    app, namespace = example_app, example_app.config.build.namespace
    first_request = len(sandbox.kube.requests)
    sandbox.kube.inject_fault("POST", rf"^/api/v1/namespaces/{namespace}/secrets$", 409, after=True)
    sandbox.kube.inject_fault("POST", rf"^/apis/batch/v1/namespaces/{namespace}/jobs$", 409, after=True)
    sandbox.kube.inject_fault("GET", rf"^/apis/batch/v1/namespaces/{namespace}/jobs$", 410)
    sandbox.buildkit.failures[AGENT_REPOSITORY] = "exit code: 1"
    try:
        assert app.run().is_failed()
    finally:
        sandbox.kube.clear_faults()
        sandbox.buildkit.failures.pop(AGENT_REPOSITORY, None)
    sandbox.buildkit.build_seconds[MCP_REPOSITORY] = 5
    try:
        cancel_once_the_job_exists(sandbox, app, len(sandbox.kube.requests), components=[MCP], deploy=False)
    finally:
        sandbox.buildkit.build_seconds.pop(MCP_REPOSITORY, None)

    records = sandbox.kube.requests[first_request:]
    assert permissions_used(records, namespace) == role_rules()
    assert any(r.namespace == release_namespace(app, MCP) and r.verb in WRITES for r in records), \
        "helm deployed weather-mcp, in its own namespace"


def test_the_rbac_manifest_binds_the_role_to_the_flow_service_account():
    documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(RBAC_FILE.read_text())}
    for document in documents.values():
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        assert document["metadata"]["namespace"] == "build"
    binding = documents[("RoleBinding", "buildkit-pipeline")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "buildkit-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "buildkit-pipeline", "namespace": "build"}]
    assert ("ServiceAccount", "buildkit-pipeline") in documents
    assert documents[("ServiceAccount", "buildkit")]["automountServiceAccountToken"] is False
    assert not [d for d in documents.values() if d["kind"] == "RoleBinding" and
                any(s["name"] == "buildkit" for s in d["subjects"])], "the build pods need no API access"
