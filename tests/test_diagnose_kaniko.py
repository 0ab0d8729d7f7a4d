"""Kaniko's failures, recognised by the same SIGNATURES as BuildKit's, in Kaniko's words.

Each fixture in tests/fixtures/kaniko/ names its source in its header (`# source:`
lines for logs, `_source` for status JSON); the header is dropped before matching.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.diagnose import SIGNATURES, diagnose, diagnose_file, explain_failure
from flows.kaniko_log import kaniko_plain
from flows.secrecy import withhold_presigned_query
from tests.conftest import fixture_log, fixture_status

FIXTURES = Path(__file__).parent / "fixtures" / "kaniko"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
PUT_IMAGE_DENIED = (
    "DENIED: User: arn:aws:sts::123456789012:assumed-role/buildkit-pipeline-push/ci is not authorized to perform: "
    "ecr:PutImage on resource: arn:aws:ecr:eu-west-1:123456789012:repository/shop/api because no identity-based "
    "policy allows the ecr:PutImage action"
)

LOG_CASES = [
    ("run-step-failed.log", "run-step-failed",
     "the Dockerfile step `RUN pip install --no-cache-dir -r requirements.txt` failed with exit code 1"),
    ("registry-auth-push-check.log", "registry-auth",
     f"the registry {ECR} refused the build's registry credentials (401 Unauthorized: Not Authorized)"),
    ("registry-auth-push-denied.log", "registry-auth",
     f"the registry {ECR} refused the build's registry credentials ({PUT_IMAGE_DENIED})"),
    ("repository-missing.log", "repository-missing", "the registry has no repository shop/api"),
    ("dockerfile-missing.log", "dockerfile-missing",
     "Kaniko found no Dockerfile at the --dockerfile path in the build context"),
    ("context-expired-url.log", "context-download",
     "Kaniko could not download the build context: HTTPSTar bad status from server: 403 Forbidden"),
    ("context-unreachable.log", "context-download",
     'Kaniko could not download the build context: Get "https://shop-contexts.s3.eu-west-1.amazonaws.com/api/'
     '5e0c2d7a9b1f.tar.gz?<presigned query withheld>": dial tcp: lookup shop-contexts.s3.eu-west-1.amazonaws.com '
     "on 10.96.0.10:53: no such host"),
    ("base-image-not-found.log", "base-image",
     "the base image python:3.99-slim could not be pulled: GET https://index.docker.io/v2/library/python/manifests/"
     "3.99-slim: MANIFEST_UNKNOWN: manifest unknown; unknown tag=3.99-slim"),
    ("base-image-auth.log", "base-image",
     "the base image 210987654321.dkr.ecr.eu-west-1.amazonaws.com/base/python:3.12 could not be pulled: GET "
     "https://210987654321.dkr.ecr.eu-west-1.amazonaws.com/v2/base/python/manifests/3.12: unexpected status code "
     "401 Unauthorized: Not Authorized"),
    ("disk-full.log", "disk-full",
     "the build ran out of disk space (write /usr/local/cuda-12.6/targets/x86_64-linux/lib/libcublasLt.so.12.6.4.1: "
     "no space left on device)"),
]

STATUS_CASES = [
    ("pod-security-admission.json", "pod-security-admission",
     'Pod Security admission (restricted:latest) refused the build pod in namespace build: allowPrivilegeEscalation '
     '!= false (container "kaniko" must set securityContext.allowPrivilegeEscalation=false)'),
    ("oom-killed.json", "oom-killed", "the Kaniko container was killed at its memory limit (OOMKilled, exit code 137)"),
    ("kaniko-image-pull.json", "buildkit-image-pull",
     "the node cannot pull the Kaniko image gcr.io/kaniko-project/executor:v1.99.0 (ErrImagePull): rpc error: "
     'code = NotFound desc = failed to pull and unpack image "gcr.io/kaniko-project/executor:v1.99.0": failed to '
     'resolve reference "gcr.io/kaniko-project/executor:v1.99.0": gcr.io/kaniko-project/executor:v1.99.0: not found'),
]

# The warning kaniko logs when it cannot push a layer to its cache, after which the build goes
# on: the NAME_UNKNOWN text of a real kaniko log (found by find_string), names adapted.
CACHE_UPLOAD_WARNING = (
    'time="2026-11-29T12:00:45Z" level=warning msg="Error uploading layer to cache: failed to push to destination '
    f"{ECR}/shop/cache:9a1b2c3d: POST https://{ECR}/v2/shop/cache/blobs/uploads/: NAME_UNKNOWN: The repository "
    "with name 'shop/cache' does not exist in the registry with id '123456789012'\""
)


def sample(name: str) -> str:
    return fixture_log(FIXTURES / name)


def kube(name: str) -> dict:
    return fixture_status(FIXTURES / name)


def kaniko_error(log: str) -> str:
    """The error Kaniko printed before it exited (rendered as diagnose sees it, a presigned query withheld)."""
    plain = withhold_presigned_query(kaniko_plain(log))
    return next(line for line in reversed(plain.splitlines()) if line.startswith(("error ", "Error: ")))


def signature(name: str):
    return next(s for s in SIGNATURES if s.name == name)


def test_every_fixture_is_a_case():
    cases = {fixture for fixture, _, _ in LOG_CASES + STATUS_CASES} | {"success-cached.log"}
    assert cases == {path.name for path in FIXTURES.iterdir()}


@pytest.mark.parametrize(("fixture", "expected", "summary"), LOG_CASES)
def test_log_signatures(fixture, expected, summary):
    found = diagnose(sample(fixture))
    assert (found.name, found.summary) == (expected, summary)
    assert found.evidence == kaniko_error(sample(fixture))
    assert found.action and "<" not in found.action


@pytest.mark.parametrize(("fixture", "expected", "summary"), STATUS_CASES)
def test_status_signatures(fixture, expected, summary):
    found = diagnose("", **kube(fixture))
    assert (found.name, found.summary) == (expected, summary)
    assert "<" not in found.action


@pytest.mark.parametrize(("fixture", "words"), [
    ("run-step-failed.log", ["fix that command in the Dockerfile"]),
    ("registry-auth-push-denied.log", ["ecr:PutImage"]),
    ("repository-missing.log", ["aws ecr create-repository --repository-name shop/api"]),
    ("dockerfile-missing.log", ["path passed as --dockerfile "]),
    ("context-expired-url.log", ["expired before the pod started", "aws.presign_ttl_seconds"]),
    ("context-unreachable.log", ["could not reach the bucket", "egress to S3"]),
    ("disk-full.log", ["Kaniko unpacks the image", "ephemeral-storage in build.resources"]),
])
def test_actions_name_the_fix_for_kaniko(fixture, words):
    action = diagnose(sample(fixture)).action
    for word in words:
        assert word in action


def test_pod_security_asks_for_baseline_not_privileged():
    action = diagnose("", **kube("pod-security-admission.json")).action
    assert "kubectl label ns build pod-security.kubernetes.io/enforce=baseline --overwrite" in action
    assert "privileged" not in action.replace("needs no privileges", "")


def test_image_pull_names_the_kaniko_setting():
    action = diagnose("", **kube("kaniko-image-pull.json")).action
    assert action.startswith("set build.kaniko_image to an existing, pinned tag such as "
                             "ghcr.io/osscontainertools/kaniko:v1.28.3")


def test_the_builders_words_follow_the_builder():
    buildkit = (FIXTURES.parent / "buildkit" / "context-download.log").read_text()
    assert diagnose(buildkit).summary.startswith("BuildKit could not download the build context")
    assert diagnose(sample("context-expired-url.log")).summary.startswith("Kaniko could not download")


@pytest.mark.parametrize(("fixture", "winner", "also_matched_by"), [
    ("context-expired-url.log", "context-download", ["registry-auth"]),
    ("base-image-auth.log", "base-image", ["registry-auth"]),
])
def test_the_most_specific_signature_wins_where_texts_overlap(fixture, winner, also_matched_by):
    plain = kaniko_plain(sample(fixture))
    for other in also_matched_by:
        assert signature(other).search(plain, ""), f"{fixture} should also look like {other}"
    assert diagnose(sample(fixture)).name == winner


def test_a_successful_build_matches_nothing():
    assert diagnose(sample("success-cached.log")) is None


def test_a_cache_upload_warning_is_not_the_failure():
    assert diagnose(sample("success-cached.log") + CACHE_UPLOAD_WARNING + "\n") is None
    unauthorized = CACHE_UPLOAD_WARNING.replace(
        "NAME_UNKNOWN: The repository with name 'shop/cache' does not exist in the registry with id '123456789012'",
        "unexpected status code 401 Unauthorized: Not Authorized",
    )
    later_stage = (
        'time="2026-11-29T12:00:50Z" level=info msg="Building stage \'node:22-slim\' [idx: \'1\', base-idx: \'-1\']"\n'
        'time="2026-11-29T12:00:52Z" level=info msg="RUN npm ci"\n'
        "npm error code E404\n"
        "error building image: error building stage: failed to execute command: waiting for process to exit: exit status 1\n"
    )
    for warning in (CACHE_UPLOAD_WARNING, unauthorized):
        found = diagnose(warning + "\n" + later_stage)
        assert (found.name, found.summary) == ("run-step-failed", "the Dockerfile step `RUN npm ci` failed with exit code 1")


def test_a_run_killed_by_a_signal_counts_as_137():
    log = (
        'time="2026-11-29T12:00:52Z" level=info msg="RUN npm run build"\n'
        "error building image: error building stage: failed to execute command: waiting for process to exit: signal: killed\n"
    )
    found = diagnose(log)
    assert found.summary == "the Dockerfile step `RUN npm run build` failed with exit code 137"
    assert "ran out of memory" in found.action


def test_a_missing_context_directory_in_the_archive():
    log = "Error: error resolving source context: stat /kaniko/buildcontext/context: no such file or directory\n"
    found = diagnose(log)
    assert found.name == "context-download"
    assert "--context-sub-path" in found.action


def test_the_status_of_a_kaniko_pod_beats_the_log_tail():
    status = kube("oom-killed.json")
    text = explain_failure(sample("run-step-failed.log"), status["job"], [status["pod"]])
    assert text.startswith("the Kaniko container was killed at its memory limit (OOMKilled, exit code 137). Fix: ")
    assert text.endswith("[oom-killed]")


def test_diagnose_file_reads_a_kaniko_fixture_with_its_header(capsys):
    assert diagnose_file(FIXTURES / "context-expired-url.log") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "context-download", "Kaniko could not download the build context: HTTPSTar bad status from server: 403 Forbidden",
    ]
    assert lines[-1] == "seen: Error: error resolving source context: HTTPSTar bad status from server: 403 Forbidden"


def test_a_pull_failure_of_the_maintained_forks_image_is_kaniko_s(tmp_path):
    """The default executor is osscontainertools/kaniko's: its pull failure names Kaniko, whatever the container."""
    text = (FIXTURES / "kaniko-image-pull.json").read_text()
    fork = tmp_path / "fork-image-pull.json"
    fork.write_text(text.replace("gcr.io/kaniko-project/executor:v1.99.0", "ghcr.io/osscontainertools/kaniko:v1.99.0")
                    .replace('"name": "kaniko"', '"name": "executor"').replace('container "kaniko"', 'container "executor"')
                    .replace("container kaniko", "container executor"))
    found = diagnose("", **fixture_status(fork))
    assert found.name == "buildkit-image-pull"
    assert found.summary.startswith("the node cannot pull the Kaniko image ghcr.io/osscontainertools/kaniko:v1.99.0")
