"""Real Kaniko Jobs (flows/kaniko.py) run by flows.build_run.run_build against the session sandbox, whose simulated
executor (sandbox/kaniko.py) checks the contract the real one depends on and fails in kaniko's words.

Each test builds weather-mcp into an ECR repository of its own, so the registry cache, the tags and the steering
of one test are not another's.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import SecretStr

import flows.build_run
from flows.build import BuildFailed, BuildRequest, BuiltImage
from flows.build_run import run_build
from flows.config import load_config
from flows.kaniko import kaniko_job_manifest
from flows.kube import kube_api
from flows.plan import package_component, plan_component, prepare_source
from flows.registry_auth import RegistryToken, mint_build_token, mint_ecr_token
from flows.upload import presign, store_context
from sandbox.example import commit_all
from sandbox.faultproxy import FaultProxy
from tests.conftest import ExampleApp, every_key

MCP = "weather-mcp"
REGISTRY = "123456789012.dkr.ecr.us-west-2.amazonaws.com"
RUN_STEP = "RUN pip install --no-cache-dir -r requirements.txt"
PUSH_CHECK = ("error checking push permissions -- make sure you entered the correct tag name, and that you are "
              "authenticated correctly, and try again: checking push permission for ")
_repositories = itertools.count(1)


@dataclass
class KanikoBuild:
    request: BuildRequest
    pod: str
    image: BuiltImage | None
    error: BuildFailed | None
    streamed: list[str]  # what run_build handed to on_log_line
    job: dict  # the Job as the emulator stored it
    terminated: dict  # the container's terminated state
    log: list[str]  # the container's log as the emulator holds it

    @property
    def messages(self) -> list[str]:
        """The `msg` of each logrus line, unquoted; other lines as they are."""
        return [_message(line) for line in self.log]


def _message(line: str) -> str:
    match = re.fullmatch(r'time="[0-9TZ:-]+" level=(\w+) msg=(.*)', line)
    if not match:
        return line
    text = json.loads(match[2]) if match[2].startswith('"') else match[2]
    return text if match[1] == "info" else f"{match[1]}: {text}"


@pytest.fixture(scope="module", autouse=True)
def builders(sandbox):
    """The simulated builders, whatever pod behaviours an earlier test module left (test_deploy.py puts back
    BuildKit only)."""
    sandbox.install_builders()


@pytest.fixture
def app(example_app, sandbox) -> ExampleApp:
    """The example app with weather-mcp in an ECR repository of its own, tagged latest too."""
    repository = f"kaniko-t{next(_repositories)}/weather-mcp"
    text = example_app.pipeline_file.read_text().replace(
        "    image: agents-on-eks/weather-mcp\n", f"    image: {repository}\n    tag_latest: true\n")
    example_app.pipeline_file.write_text(text)
    commit_all(example_app.root, "weather-mcp in a repository of its own")
    config = load_config(example_app.pipeline_file)
    return ExampleApp(example_app.pipeline_file, config, sandbox.prepare(config))


def repository_of(app: ExampleApp) -> str:
    return app.config.image_repository(app.config.component(MCP))


def kaniko_request(app: ExampleApp, *, context_url: str | None = None, builder: str = "kaniko") -> BuildRequest:
    """The request the flow would make for weather-mcp: the context packaged and uploaded, its URL presigned."""
    config, source = prepare_source(app.pipeline_file)
    component = config.component(MCP)
    archive = package_component(config, component, source)
    credentials = app.flow_kwargs["aws_credentials"]
    stored = store_context(archive, credentials=credentials, bucket=config.aws.bucket, prefix=config.aws.prefix,
                           component=MCP)
    uploaded = presign(credentials, stored, config.aws.presign_ttl_seconds)
    plan = plan_component(config, component, source, archive, run_id=str(uuid.uuid4()), builder=builder,
                          context_url=context_url or uploaded.url.get_secret_value())
    return plan.request


def build(sandbox, app: ExampleApp, request: BuildRequest, *, token: RegistryToken | None = None) -> KanikoBuild:
    """run_build for the request; the outcome and what the stand-ins hold about it."""
    token = token or mint_ecr_token(app.flow_kwargs["aws_credentials"], app.config.registry)
    streamed: list[str] = []

    async def go() -> BuiltImage:
        async with kube_api(app.flow_kwargs["kubeconfig"]) as api:
            return await run_build(api, component=MCP, request=request, token=token, secret_values={},
                                   on_log_line=streamed.append)

    image = error = None
    try:
        image = asyncio.run(go())
    except BuildFailed as exc:
        error = exc
    namespace = request.settings.namespace
    [pod] = sandbox.kube.list("pods", namespace, label_selector=f"job-name={request.name}")
    [status] = pod["status"]["containerStatuses"]
    text = "".join(chunk.text for chunk in sandbox.kube.logs.chunks(namespace, pod["metadata"]["name"], "kaniko"))
    job = sandbox.kube.get("jobs", namespace, request.name)
    return KanikoBuild(request, pod["metadata"]["name"], image, error, streamed, job, status["state"]["terminated"],
                       text.splitlines())


def recorded(sandbox, result: KanikoBuild) -> dict:
    [record] = [b for b in sandbox.kaniko.builds if b["pod"].startswith(f"{result.request.name}-")]
    return record


def ecr_image(sandbox, app: ExampleApp, tag: str) -> tuple[dict, dict]:
    """describe_images and the manifest ECR holds for a tag of the app's weather-mcp repository."""
    ecr = sandbox.aws.client("ecr", app.config.aws.region)
    repository = repository_of(app).partition("/")[2]
    [details] = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])["imageDetails"]
    [image] = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageTag": tag}])["images"]
    return details, json.loads(image["imageManifest"])


@pytest.fixture
def altered_job(monkeypatch):
    """Make run_build create the Kaniko Job of flows/kaniko.py changed by `alter(job, container)`."""
    def use(alter) -> None:
        def manifest(request: BuildRequest) -> dict:
            job = copy.deepcopy(kaniko_job_manifest(request))
            alter(job, job["spec"]["template"]["spec"]["containers"][0])
            return job
        monkeypatch.setattr(flows.build_run, "job_manifest", manifest)
    return use


# ---------------------------------------------------------------- success


def test_a_kaniko_build_pushes_every_tag_with_the_digest_run_build_returns(prefect_server, sandbox, app):
    result = build(sandbox, app, kaniko_request(app))

    assert result.error is None
    repository = repository_of(app)
    assert result.image.tags == [result.request.image.tags[0], result.request.image.context_tag, "latest"]
    assert result.terminated["exitCode"] == 0 and result.terminated["message"] == result.image.digest
    for tag in result.image.tags:
        details, manifest = ecr_image(sandbox, app, tag)
        assert details["imageDigest"] == result.image.digest
        # FROM, COPY requirements.txt, RUN pip install, COPY . .
        assert [layer["mediaType"] for layer in manifest["layers"]] == \
            ["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 4
        assert details["imageSizeInBytes"] == sum(layer["size"] for layer in manifest["layers"])
    record = recorded(sandbox, result)
    assert record["destinations"] == [f"{repository}:{tag}" for tag in result.image.tags]
    assert record["docker_config"] == {"path": "/kaniko/.docker/config.json",
                                       "secret": f"{result.request.name}-registry"}
    pod_spec = result.job["spec"]["template"]["spec"]
    assert "privileged" not in every_key(result.job)
    assert [c["name"] for c in pod_spec["containers"]] == ["kaniko"] and "command" not in pod_spec["containers"][0]
    assert result.streamed == result.log


def test_the_log_is_kaniko_text_output_stage_by_stage(prefect_server, sandbox, app):
    result = build(sandbox, app, kaniko_request(app))

    repository, digest = repository_of(app), result.image.digest
    [cache_key] = {m.rpartition(":")[2].rstrip(".") for m in result.messages if m.startswith("Checking for cached")}
    assert re.fullmatch(r"[0-9a-f]{64}", cache_key)
    [cache_manifest] = [m.rpartition("@")[2] for m in result.messages if m.startswith(f"Pushed {repository}@")][:1]
    base = "python:3.12-slim"
    assert result.messages == [
        "Retrieving https tar file", "Retrieved https tar file", "Extracted https tar file",
        f"Retrieving image manifest {base}", f"Retrieving image {base} from registry index.docker.io",
        f"Retrieving image manifest {base}", "Returning cached image manifest",
        "Built cross stage deps: map[]",
        f"Retrieving image manifest {base}", "Returning cached image manifest",
        f"Retrieving image manifest {base}", "Returning cached image manifest",
        "Executing 0 build triggers",
        f"Building stage '{base}' [idx: '0', base-idx: '-1']",
        f"Checking for cached layer {repository}:{cache_key}...",
        f"No cached layer found for cmd {RUN_STEP}",
        "Cmd: EXPOSE", "Adding exposed port: 8080/tcp",
        "Unpacking rootfs as cmd COPY requirements.txt . requires it.",
        "WORKDIR /app", "Cmd: workdir", "Changed working directory to /app",
        "Creating directory /app with uid -1 and gid -1", "Taking snapshot of files...",
        "COPY requirements.txt .", "Taking snapshot of files...",
        RUN_STEP, "Initializing snapshotter ...", "Taking snapshot of full filesystem...",
        "Cmd: /bin/sh", "Args: [-c pip install --no-cache-dir -r requirements.txt]",
        "Running: [/bin/sh -c pip install --no-cache-dir -r requirements.txt]",
        "Taking snapshot of full filesystem...",
        f"Pushing layer {repository}:{cache_key} to cache now",
        f"Pushing image to {repository}:{cache_key}",
        f"Pushed {repository}@{cache_manifest}",
        "COPY . .", "Taking snapshot of files...",
        "EXPOSE 8080", "Cmd: EXPOSE", "Adding exposed port: 8080/tcp",
        "No files changed in this command, skipping snapshotting.",
        "USER 1000", "No files changed in this command, skipping snapshotting.",
        'CMD ["python", "server.py"]', "No files changed in this command, skipping snapshotting.",
        *[line for tag in result.image.tags for line in (f"Pushing image to {repository}:{tag}",
                                                          f"Pushed {repository}@{digest}")],
    ]
    assert re.fullmatch(r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ" level=info msg="Retrieving https tar file"',
                        result.log[0])
    assert [line.partition(" ")[2] for line in result.log if "CMD" in line] == \
        [r'level=info msg="CMD [\"python\", \"server.py\"]"']
    assert 'level=info msg=Building' not in "\n".join(result.log)


def test_the_second_build_takes_the_run_step_from_the_registry_cache(prefect_server, sandbox, app):
    first = build(sandbox, app, kaniko_request(app))
    second = build(sandbox, app, kaniko_request(app))

    assert f"No cached layer found for cmd {RUN_STEP}" in first.messages
    assert f"Using caching version of cmd: {RUN_STEP}" in second.messages
    run_at = second.messages.index(RUN_STEP)
    assert second.messages[run_at + 1] == "Found cached layer, extracting to filesystem"
    assert not any(m.startswith(("Running:", "Pushing layer")) for m in second.messages)
    assert recorded(sandbox, second)["cached"] == [RUN_STEP]
    [key] = {m.rpartition(":")[2].rstrip(".") for m in second.messages if m.startswith("Checking for cached")}
    _, cache_image = ecr_image(sandbox, app, key)
    assert len(cache_image["layers"]) == 1, "kaniko caches a RUN as a one-layer image tagged with its key"
    assert second.image.digest == first.image.digest


def test_kaniko_and_buildkit_push_different_digests_of_the_same_layers(prefect_server, sandbox, app):
    kaniko = build(sandbox, app, kaniko_request(app))
    _, kaniko_manifest = ecr_image(sandbox, app, kaniko.image.tags[0])
    buildkit_image = asyncio.run(_buildkit(app, kaniko_request(app, builder="buildkit")))
    buildkit_details, buildkit_manifest = ecr_image(sandbox, app, buildkit_image.tags[0])

    assert buildkit_image.digest != kaniko.image.digest
    assert buildkit_details["imageDigest"] == buildkit_image.digest
    assert [layer["size"] for layer in buildkit_manifest["layers"]] == \
        [layer["size"] for layer in kaniko_manifest["layers"]]
    assert buildkit_manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert kaniko_manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


async def _buildkit(app: ExampleApp, request: BuildRequest) -> BuiltImage:
    token = mint_ecr_token(app.flow_kwargs["aws_credentials"], app.config.registry)
    async with kube_api(app.flow_kwargs["kubeconfig"]) as api:
        return await run_build(api, component=MCP, request=request, token=token, secret_values={},
                               on_log_line=lambda line: None)


def test_a_missing_cache_repository_costs_the_cache_not_the_build(prefect_server, sandbox, app):
    cache = f"{REGISTRY}/{repository_of(app).partition('/')[2]}-no-such-cache"

    first = build(sandbox, app, kaniko_request(app).model_copy(update={"cache_repository": cache}))
    second = build(sandbox, app, kaniko_request(app).model_copy(update={"cache_repository": cache}))

    assert first.error is None and first.terminated["exitCode"] == 0
    [key] = {m.rpartition(":")[2].rstrip(".") for m in first.messages if m.startswith("Checking for cached")}
    missing = (f"POST https://{REGISTRY}/v2/{cache.partition('/')[2]}/blobs/uploads/: NAME_UNKNOWN: The repository "
               f"with name '{cache.partition('/')[2]}' does not exist in the registry with id '123456789012'")
    assert [m for m in first.messages if m.startswith("warning: ")] == [
        f"warning: Retrying operation after 1s due to {missing}",
        f"warning: Retrying operation after 2s due to {missing}",
        f"warning: Error uploading layer to cache: failed to push to destination {cache}:{key}: {missing}",
    ]
    assert f"No cached layer found for cmd {RUN_STEP}" in second.messages
    assert ecr_image(sandbox, app, "latest")[0]["imageDigest"] == second.image.digest


# ---------------------------------------------------------------- broken contracts


def assert_failed_with(result: KanikoBuild, last_line: str) -> None:
    assert result.image is None and result.error is not None
    assert result.terminated["exitCode"] == 1 and "message" not in result.terminated
    assert result.log[-1] == last_line
    assert last_line in str(result.error)


def test_a_token_that_is_not_the_minted_one_fails_the_push_permission_check(prefect_server, sandbox, app):
    wrong = RegistryToken(registry=app.config.registry, token=SecretStr(base64.b64encode(b"AWS:stale").decode()),
                          expires_at=datetime.now(timezone.utc) + timedelta(hours=12))
    request = kaniko_request(app)

    result = build(sandbox, app, request, token=wrong)

    destination, repository = request.image.names[0], repository_of(app).partition("/")[2]
    assert_failed_with(result, f'{PUSH_CHECK}"{destination}": POST https://{REGISTRY}/v2/{repository}/blobs/uploads/: '
                               "unexpected status code 401 Unauthorized: Not Authorized")
    assert result.messages[:3] == ["Retrieving https tar file", "Retrieved https tar file", "Extracted https tar file"]
    assert len(result.log) == 4
    assert not [b for b in sandbox.kaniko.builds if b["pod"].startswith(request.name)]


def test_a_token_scoped_to_another_repository_is_denied_by_the_push_permission_check(prefect_server, sandbox, app):
    """ECR authorizes the token's POST against its session policy: ecr:InitiateLayerUpload is not allowed here."""
    from sandbox.aws import BUILD_ROLE_ARN

    other = f"{app.config.registry}/agents-on-eks/weather-agent"
    scoped = mint_build_token(app.flow_kwargs["aws_credentials"], app.config.registry, role_arn=BUILD_ROLE_ARN,
                              repositories=[other], session="kaniko-scope-test", lasting_seconds=900)
    request = kaniko_request(app)

    result = build(sandbox, app, request, token=scoped)

    destination, repository = request.image.names[0], repository_of(app).partition("/")[2]
    assert_failed_with(result, f'{PUSH_CHECK}"{destination}": POST https://{REGISTRY}/v2/{repository}/blobs/uploads/: '
                               "DENIED: User: arn:aws:sts::123456789012:assumed-role/buildkit-pipeline-build/"
                               "kaniko-scope-test is not authorized to perform: ecr:InitiateLayerUpload on resource: "
                               f"arn:aws:ecr:us-west-2:123456789012:repository/{repository} because no session policy "
                               "allows the ecr:InitiateLayerUpload action")


def test_without_the_mounted_config_json_the_executor_has_no_credentials(prefect_server, sandbox, app, altered_job):
    def unmount(job, container):
        container["volumeMounts"] = []
    altered_job(unmount)
    request = kaniko_request(app)

    result = build(sandbox, app, request)

    repository = repository_of(app).partition("/")[2]
    assert_failed_with(result, f'{PUSH_CHECK}"{request.image.names[0]}": POST https://{REGISTRY}/v2/{repository}/'
                               "blobs/uploads/: unexpected status code 401 Unauthorized: Not Authorized")


def test_a_config_json_mounted_under_another_name_is_not_read(prefect_server, sandbox, app, altered_job):
    def without_items(job, container):
        del job["spec"]["template"]["spec"]["volumes"][0]["secret"]["items"]  # mounted as .dockerconfigjson
    altered_job(without_items)

    result = build(sandbox, app, kaniko_request(app))

    assert result.log[-1].startswith(PUSH_CHECK) and result.log[-1].endswith("401 Unauthorized: Not Authorized")


def test_a_dockerfile_path_outside_the_archive_fails_as_kaniko_does(prefect_server, sandbox, app):
    request = kaniko_request(app)
    request = request.model_copy(update={"archive": request.archive.model_copy(update={"dockerfile": "Containerfile"})})

    result = build(sandbox, app, request)

    assert "--dockerfile=/kaniko/buildcontext/Containerfile" in result.job["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert_failed_with(result, "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile "
                               "within the build context with --dockerfile")


def test_a_context_url_s3_refuses_fails_with_httpstar_bad_status(prefect_server, sandbox, app):
    """moto does not check presigned signatures, so the fault proxy answers the tampered URL as S3 would."""
    request = kaniko_request(app)
    tampered = re.sub(r"X-Amz-Signature=[0-9a-f]+", "X-Amz-Signature=" + "0" * 64, request.context_url)
    with FaultProxy(sandbox.aws.url) as proxy:
        proxy.fail("GET", rf"^/{app.config.aws.bucket}/", 403, times=None)
        url = f"{proxy.url}/{tampered.split('/', 3)[3]}"
        result = build(sandbox, app, request.model_copy(update={"context_url": url}))

        assert [s.status for s in proxy.log] == [403]
    assert_failed_with(result, "Error: error resolving source context: HTTPSTar bad status from server: 403 Forbidden")
    assert result.messages == ["Retrieving https tar file", result.log[-1]]


def test_an_unreachable_context_url_is_reported_without_its_signature(prefect_server, sandbox, app):
    """Kaniko prints the whole URL when the download fails; the error the flow raises keeps the signature out."""
    request = kaniko_request(app)
    signature = re.search(r"X-Amz-Signature=([0-9a-f]+)", request.context_url)[1]
    unreachable = "http://127.0.0.1:9/" + request.context_url.split("/", 3)[3]
    result = build(sandbox, app, request.model_copy(update={"context_url": unreachable}))

    assert signature in result.log[-1] and result.log[-1].startswith("Error: error resolving source context: Get ")
    assert signature not in str(result.error)
    assert "127.0.0.1:9/" in str(result.error) and "?<presigned query withheld>" in str(result.error)


def test_a_plain_http_context_outside_the_sandbox_is_an_unknown_prefix(prefect_server, sandbox, app):
    result = build(sandbox, app, kaniko_request(app, context_url="http://contexts.example.com/weather-mcp.tar.gz"))

    assert_failed_with(result, "Error: error resolving source context: unknown build context prefix provided, please "
                               "use one of the following: gs://, dir://, tar://, s3://, git://, https://")


def test_a_missing_context_sub_path_fails_its_stat(prefect_server, sandbox, app, altered_job):
    def sub_path(job, container):
        container["args"] = [a.replace("--context-sub-path=context", "--context-sub-path=src") for a in
                             container["args"]]
    altered_job(sub_path)

    result = build(sandbox, app, kaniko_request(app))

    assert_failed_with(result, "Error: error resolving source context: stat /kaniko/buildcontext/src: no such file or "
                               "directory")


def test_no_destination_is_kaniko_own_error(prefect_server, sandbox, app, altered_job):
    def no_destination(job, container):
        container["args"] = [a for a in container["args"] if not a.startswith("--destination=")]
    altered_job(no_destination)

    result = build(sandbox, app, kaniko_request(app))

    assert_failed_with(result, "Error: you must provide --destination, or use --no-push")
    assert len(result.log) == 1


def test_a_digest_file_elsewhere_pushes_but_reports_no_digest(prefect_server, sandbox, app, altered_job):
    def elsewhere(job, container):
        container["args"] = [a.replace("--digest-file=/dev/termination-log", "--digest-file=/kaniko/digest")
                             for a in container["args"]]
    altered_job(elsewhere)

    result = build(sandbox, app, kaniko_request(app))

    assert result.terminated["exitCode"] == 0 and "message" not in result.terminated
    assert "the build pushed no digest" in str(result.error)
    assert ecr_image(sandbox, app, "latest")[0]["imageDigest"] == recorded(sandbox, result)["digest"]


def test_a_privileged_kaniko_pod_is_refused(prefect_server, sandbox, app, altered_job):
    def privileged(job, container):
        container["securityContext"] = {"privileged": True}
    altered_job(privileged)

    result = build(sandbox, app, kaniko_request(app))

    assert_failed_with(result, f'pods "{result.pod}" is forbidden: violates PodSecurity "baseline:latest": '
                               'privileged (container "kaniko" must not set securityContext.privileged=true)')
    assert len(result.log) == 1


# ---------------------------------------------------------------- steering


def test_a_failing_run_step_prints_its_output_then_kaniko_error(prefect_server, sandbox, app, monkeypatch):
    monkeypatch.setitem(sandbox.kaniko.failures, repository_of(app), "ERROR: No matching distribution found for x==9")

    result = build(sandbox, app, kaniko_request(app))

    assert_failed_with(result, "error building image: error building stage: failed to execute command: waiting for "
                               "process to exit: exit status 1")
    assert result.log[-2] == "ERROR: No matching distribution found for x==9"
    assert result.messages[-3] == "Running: [/bin/sh -c pip install --no-cache-dir -r requirements.txt]"


def test_a_killed_executor_exits_137_with_the_reason(prefect_server, sandbox, app, monkeypatch):
    monkeypatch.setitem(sandbox.kaniko.kills, repository_of(app), "OOMKilled")

    result = build(sandbox, app, kaniko_request(app))

    assert result.terminated["exitCode"] == 137 and result.terminated["reason"] == "OOMKilled"
    assert "message" not in result.terminated
    assert result.messages[-1] == "Running: [/bin/sh -c pip install --no-cache-dir -r requirements.txt]"
    assert result.error is not None and result.image is None
