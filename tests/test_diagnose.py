"""Failure signatures recognised from real BuildKit log texts and Kubernetes status JSON.

Each fixture in tests/fixtures/buildkit/ names its source in its header (`# source:`
lines for logs, `_source` for status JSON); the header is dropped before matching so
only the sample text itself can match.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.diagnose import NO_MATCH, SIGNATURES, diagnose, diagnose_file, explain_failure, status_lines
from tests.conftest import fixture_log, fixture_status

FIXTURES = Path(__file__).parent / "fixtures" / "buildkit"

LOG_CASES = [
    ("rootless-userns.log", "rootless-userns"),
    ("rootless-userns-invalid-argument.log", "rootless-userns"),
    ("rootless-confined.log", "rootless-confined"),
    ("buildkitd-not-privileged.log", "buildkitd-not-privileged"),
    ("buildkitd-not-privileged-proc.log", "buildkitd-not-privileged"),
    ("buildkitd-not-privileged-rootless-proc.log", "buildkitd-not-privileged"),
    ("disk-full.log", "disk-full"),
    ("buildkitd-did-not-start.log", "buildkitd-did-not-start"),
    ("context-download.log", "context-download"),
    ("dockerfile-missing.log", "dockerfile-missing"),
    ("base-image-not-found.log", "base-image"),
    ("base-image-auth.log", "base-image"),
    ("repository-missing.log", "repository-missing"),
    ("registry-auth-ecr-401.log", "registry-auth"),
    ("registry-auth-oauth.log", "registry-auth"),
    ("registry-auth-ecr-denied.log", "registry-auth"),
    ("registry-auth-no-basic-auth.log", "registry-auth"),
    ("run-step-failed.log", "run-step-failed"),
    ("run-step-failed-legacy.log", "run-step-failed"),
    ("rawjson_failed_run.jsonl", "run-step-failed"),
]

STATUS_CASES = [
    ("pod-security-admission.json", "pod-security-admission"),
    ("pod-create-failed.json", "pod-create-failed"),
    ("unschedulable.json", "unschedulable"),
    ("buildkit-image-pull.json", "buildkit-image-pull"),
    ("oom-killed.json", "oom-killed"),
    ("deadline-exceeded.json", "deadline-exceeded"),
    ("secret-missing.json", "secret-missing"),
]


def sample(name: str) -> str:
    return fixture_log(FIXTURES / name)


def kube(name: str) -> dict:
    return fixture_status(FIXTURES / name)


def signature(name: str):
    return next(s for s in SIGNATURES if s.name == name)


@pytest.mark.parametrize(("fixture", "expected"), LOG_CASES)
def test_log_signatures(fixture, expected):
    found = diagnose(sample(fixture))
    assert found is not None and found.name == expected
    assert found.summary and found.action and found.evidence
    assert "<" not in found.summary + found.action, "every template value is filled"


@pytest.mark.parametrize(("fixture", "expected"), STATUS_CASES)
def test_status_signatures(fixture, expected):
    found = diagnose("", **kube(fixture))
    assert found is not None and found.name == expected
    assert "<" not in found.summary + found.action


def test_every_signature_has_a_sample():
    covered = {name for _, name in LOG_CASES + STATUS_CASES}
    assert covered == {s.name for s in SIGNATURES}


def test_names_are_unique():
    names = [s.name for s in SIGNATURES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("fixture", ["success.log", "rawjson_success.jsonl"])
def test_a_successful_build_matches_nothing(fixture):
    completed = {
        "pod": {"metadata": {"namespace": "build"}, "status": {"phase": "Succeeded", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{"name": "buildkit", "image": "moby/buildkit:v0.20.1", "state": {
                "terminated": {"exitCode": 0, "reason": "Completed", "message": '{"containerimage.digest":"sha256:ab"}'}}}]}},
        "job": {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}},
        "events": [{"type": "Normal", "reason": "SuccessfulCreate", "message": "Created pod: build-api-x7k2p",
                    "involvedObject": {"kind": "Job", "name": "build-api"}}],
    }
    assert diagnose(sample(fixture), **completed) is None


@pytest.mark.parametrize(("fixture", "winner", "also_matched_by"), [
    ("rootless-userns.log", "rootless-userns", ["disk-full", "buildkitd-did-not-start"]),
    ("rootless-confined.log", "rootless-confined", ["buildkitd-did-not-start"]),
    ("buildkitd-not-privileged.log", "buildkitd-not-privileged", []),
    ("buildkitd-not-privileged-proc.log", "buildkitd-not-privileged", ["run-step-failed"]),
    ("base-image-auth.log", "base-image", ["registry-auth"]),
    ("base-image-not-found.log", "base-image", ["registry-auth"]),
    ("repository-missing.log", "repository-missing", []),
])
def test_the_most_specific_signature_wins_where_texts_overlap(fixture, winner, also_matched_by):
    plain = sample(fixture)
    for other in also_matched_by:
        assert signature(other).search(plain, ""), f"{fixture} should also look like {other}"
    assert diagnose(plain).name == winner


def test_not_privileged_is_not_mistaken_for_a_missing_dockerfile():
    text = sample("buildkitd-not-privileged.log")
    assert "failed to read dockerfile" in text
    assert not signature("dockerfile-missing").search(text, "")


def test_deadline_wins_over_the_sigkill_it_causes():
    status = kube("deadline-exceeded.json")
    assert signature("oom-killed").search("", "\n".join(status_lines(**status)))
    assert diagnose("", **status).name == "deadline-exceeded"


def test_status_beats_what_the_log_tail_shows():
    status = kube("oom-killed.json")
    assert diagnose(sample("run-step-failed.log"), **status).name == "oom-killed"


def test_rawjson_logs_are_read_through_their_vertex_errors():
    found = diagnose(sample("rawjson_failed_run.jsonl"))
    assert found.summary == "the Dockerfile step `[5/5] RUN python -m pytest -q` failed with exit code 1"


def test_run_step_is_named_from_its_vertex_and_exit_137_hints_memory():
    log = (
        "#7 [builder 3/6] RUN npm run build\n"
        "#7 41.20 <--- Last few GCs --->\n"
        '#7 ERROR: process "/bin/sh -c npm run build" did not complete successfully: exit code: 137\n'
    )
    found = diagnose(log)
    assert found.name == "run-step-failed"
    assert "`[builder 3/6] RUN npm run build`" in found.summary
    assert "137" in found.summary and "out of memory" in found.action


@pytest.mark.parametrize(("fixture", "words"), [
    ("repository-missing.log", ["create the ECR repository shop/api", "`image:`"]),
    ("rootless-userns.log", ["set build.mode: privileged", "user namespaces"]),
    ("context-download.log", ["403", "presign_ttl_seconds"]),
    ("registry-auth-ecr-401.log", ["730335560480.dkr.ecr.us-west-2.amazonaws.com", "ecr:InitiateLayerUpload"]),
    ("base-image-auth.log", ["docker.io/lukemathwalker/cargo-chef:latest-rust-1.74-slim-bookworm", "401"]),
    ("dockerfile-missing.log", ["Dockerfile", "--opt filename"]),
    ("buildkitd-not-privileged.log", ["privileged: true", "--oci-worker-no-process-sandbox"]),
])
def test_messages_name_the_concrete_fix(fixture, words):
    found = diagnose(sample(fixture))
    text = f"{found.summary}\n{found.action}"
    for word in words:
        assert word in text


def test_pod_security_names_the_namespace_and_the_label():
    found = diagnose("", **kube("pod-security-admission.json"))
    assert "kubectl label ns build pod-security.kubernetes.io/enforce=privileged" in found.action
    assert 'restricted:latest' in found.summary
    assert 'privileged (container "buildkit" must not set securityContext.privileged=true)' in found.summary


def test_image_pull_names_the_image():
    status = kube("buildkit-image-pull.json")
    assert "moby/buildkit:v0.99.0" in diagnose("", **status).summary
    without_events = {**status, "events": None}
    found = diagnose("", **without_events)
    assert found.name == "buildkit-image-pull" and "(ImagePullBackOff)" in found.summary


def test_unschedulable_from_a_scheduling_event():
    events = [{"type": "Warning", "reason": "FailedScheduling", "involvedObject": {"kind": "Pod", "name": "b"},
               "message": "0/3 nodes are available: 3 Insufficient cpu."}]
    found = diagnose("", events=events)
    assert found.name == "unschedulable" and "3 Insufficient cpu" in found.summary


def test_no_input_matches_nothing():
    assert diagnose("") is None
    assert diagnose("", pod={}, job={}, events=[]) is None


def test_diagnose_file_prints_the_name_first_and_returns_0(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(sample("repository-missing.log"))
    assert diagnose_file(log) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "repository-missing"
    assert lines[1] == "the registry has no repository shop/api"
    assert lines[2].startswith("fix: create the ECR repository shop/api")


def test_diagnose_file_reads_a_raw_fixture_with_its_header(capsys):
    assert diagnose_file(FIXTURES / "rawjson_failed_run.jsonl") == 0
    assert capsys.readouterr().out.splitlines()[0] == "run-step-failed"


def test_diagnose_file_returns_1_when_nothing_matched(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(sample("success.log"))
    assert diagnose_file(str(log)) == 1
    assert capsys.readouterr().out.splitlines() == [NO_MATCH]


def test_explain_failure_gives_the_summary_and_the_fix():
    status = kube("oom-killed.json")
    text = explain_failure("", status["job"], [status["pod"]])
    assert text.startswith("the BuildKit container was killed at its memory limit")
    assert "Fix: raise build.resources.limits.memory" in text and text.endswith("[oom-killed]")


def test_explain_failure_falls_back_to_the_job_condition():
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                      "message": "Job has reached the specified backoff limit"}]}}
    assert "BackoffLimitExceeded" in explain_failure("#1 DONE 0.1s\n", job, [])
