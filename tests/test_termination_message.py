"""The digest's way back: buildctl's metadata file, the container's filesystem and its termination message."""

from __future__ import annotations

import json

import pytest

from flows.results import PipelineFailed
from sandbox.example import commit_all
from sandbox.kube.containerfs import ContainerFS, Node
from sandbox.shell import run_argv
from tests.conftest import by_name, jobs

MCP = "weather-mcp"
MCP_REPOSITORY = "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp"


def build_pod(sandbox, app, component: str = MCP) -> dict:
    [job] = jobs(sandbox, app, component)
    [pod] = sandbox.kube.list("pods", app.config.build.namespace, label_selector=f"job-name={job['metadata']['name']}")
    return pod


def terminated(pod: dict) -> dict:
    [status] = pod["status"]["containerStatuses"]
    return status["state"]["terminated"]


def pod_log(sandbox, pod: dict) -> str:
    chunks = sandbox.kube.logs.chunks(pod["metadata"]["namespace"], pod["metadata"]["name"], "buildkit")
    return "".join(chunk.text for chunk in chunks)


@pytest.mark.parametrize("mode", ["privileged", "rootless"])
def test_the_digest_reaches_the_termination_message_through_a_plain_write(prefect_server, sandbox, example_app, mode):
    if mode == "rootless":
        text = example_app.pipeline_file.read_text().replace("mode: privileged}", "mode: rootless}")
        example_app.pipeline_file.write_text(text)
        commit_all(example_app.root, "Rootless builds")

    result = example_app.run(deploy=False).result()

    pod = build_pod(sandbox, example_app)
    assert pod["spec"]["containers"][0]["image"].endswith("-rootless") == (mode == "rootless")
    state = terminated(pod)
    assert state["exitCode"] == 0, pod_log(sandbox, pod)[-2000:]
    assert json.loads(state["message"])["containerimage.digest"] == by_name(result)[MCP].image.digest
    assert "device or resource busy" not in pod_log(sandbox, pod)


def test_a_failed_build_keeps_buildctls_exit_status_and_writes_no_termination_message(
        prefect_server, sandbox, example_app, monkeypatch):
    monkeypatch.setitem(sandbox.buildkit.failures, MCP_REPOSITORY,
                        'process "/bin/sh -c pip install -r requirements.txt" did not complete successfully: exit code: 1')

    with pytest.raises(PipelineFailed, match=r"run-step-failed"):
        example_app.run(deploy=False).result()

    pod = build_pod(sandbox, example_app)
    state = terminated(pod)
    assert state["exitCode"] == 1 and state["reason"] == "Error"
    assert "message" not in state
    assert pod_log(sandbox, pod).rstrip().endswith("did not complete successfully: exit code: 1")


# ---------------------------------------------------------------- the stand-ins themselves

def container_fs(uid: int = 0) -> ContainerFS:
    container = {"terminationMessagePath": "/dev/termination-log", "securityContext": {"runAsUser": uid},
                 "volumeMounts": [{"name": "config", "mountPath": "/buildkit/docker-config", "readOnly": True}]}
    return ContainerFS.for_container({"spec": {}}, container, {"/tmp": Node(0, 0o1777), "/dev": Node(0, 0o755)})


def test_a_rename_onto_the_termination_message_mount_is_ebusy_and_uid_1000_cannot_create_in_dev():
    fs = container_fs(uid=0)
    fs.create_exclusive("/dev/.tmp-termination-log1")
    with pytest.raises(OSError) as busy:
        fs.rename("/dev/.tmp-termination-log1", "/dev/termination-log")
    assert busy.value.strerror == "Device or resource busy"
    fs.write("/dev/termination-log", b"plain")
    assert fs.termination_message() == "plain"

    with pytest.raises(PermissionError):
        container_fs(uid=1000).create_exclusive("/dev/.tmp-termination-log2")
    with pytest.raises(OSError, match="Read-only"):
        container_fs(uid=0).write("/buildkit/docker-config/x", b"")


def test_the_shell_model_runs_lists_redirections_and_positional_args_and_knows_nothing_else():
    fs, log, seen = container_fs(uid=1000), [], []

    def program(process):
        seen.append(process.args)
        process.fs.write("/tmp/out", b"written")
        return 3 if process.args == ["fail"] else 0

    argv = ["/bin/sh", "-c", 'prog "$@" && cat /tmp/out > /dev/termination-log; cp /tmp/out /tmp/copy',
            "prog", "a b", "c"]
    assert run_argv(argv, fs, {}, {"prog": program}, log.append) == 0
    assert seen == [["a b", "c"]] and fs.termination_message() == "written" and fs.read("/tmp/copy") == b"written"

    fs = container_fs(uid=1000)
    assert run_argv(["/bin/sh", "-c", 'prog "$@" && cat /tmp/out > /dev/termination-log', "prog", "fail"],
                    fs, {}, {"prog": program}, log.append) == 3
    assert fs.termination_message() == ""
    assert run_argv(["/bin/sh", "-c", "echo hi || exit 4"], fs, {}, {}, log.append) == 4
    assert log[-1] == "sh: echo: not found"
    assert run_argv(["/bin/sh", "-c", "cat /tmp/nothing > /dev/x"], fs, {}, {}, log.append) == 1
    assert log[-1] == "sh: can't create /dev/x: Permission denied"
    assert run_argv(["/bin/sh", "-c", "prog | cat"], fs, {}, {"prog": program}, log.append) == 2
