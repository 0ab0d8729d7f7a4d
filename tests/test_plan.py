"""`buildkit-pipeline plan`: everything that needs neither AWS nor a cluster, as JSON."""

from __future__ import annotations

import json
import re
import subprocess
import tarfile

import pytest

from flows.cli import main
from flows.config import ConfigError, parse_config
from sandbox.example import create_example_repo
from tests.conftest import HELM


@pytest.fixture
def plan_repo(tmp_path):
    return create_example_repo(tmp_path / "app")


def plan_json(pipeline_file, capsys, *extra) -> dict:
    assert main(["plan", "--config", str(pipeline_file), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_documented_shape(plan_repo, capsys):
    plan = plan_json(plan_repo, capsys)
    assert re.fullmatch(r"[0-9a-f]{40}", plan["commit"])
    names = [c["name"] for c in plan["components"]]
    assert names == ["weather-mcp", "weather-agent"]
    mcp = plan["components"][0]
    assert set(mcp["archive"]) >= {"sha256", "bytes", "files", "dockerfile", "contextsubdir"}
    assert mcp["archive"]["dockerfile"] == "Dockerfile" and mcp["archive"]["contextsubdir"] == "context"
    assert mcp["image"] == {
        "repository": "123456789012.dkr.ecr.us-west-2.amazonaws.com/agents-on-eks/weather-mcp",
        "tags": [plan["commit"][:12], f"ctx-{mcp['archive']['sha256'][:12]}"],
    }
    job = mcp["job"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "context=$(CONTEXT_URL)" in args
    assert mcp["helm"][:4] == ["helm", "upgrade", "--install", "weather-mcp"]
    assert f"image.tag={plan['commit'][:12]}@sha256:<digest>" in mcp["helm"]


def test_plan_archive_leaves_out_what_dockerignore_excludes(plan_repo, capsys, tmp_path):
    from flows.plan import archive_dir

    plan = plan_json(plan_repo, capsys, "--components", "weather-mcp")
    [mcp] = plan["components"]
    with tarfile.open(archive_dir() / f"{mcp['archive']['sha256']}.tar.gz") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert names == ["Dockerfile", "context/requirements.txt", "context/server.py"]
    assert mcp["archive"]["files"] == 2


def test_plan_is_stable_for_the_same_commit(plan_repo, capsys):
    assert plan_json(plan_repo, capsys) == plan_json(plan_repo, capsys)


def test_helm_template_renders_the_pinned_image(plan_repo, capsys):
    plan = plan_json(plan_repo, capsys)
    for component in plan["components"]:
        argv = component["helm"]
        chart, release = argv[4], argv[3]
        values = [argv[i + 1] for i, a in enumerate(argv) if a in ("--values", "--set-string")]
        flags = []
        for i, a in enumerate(argv):
            if a in ("--values", "--set-string", "--namespace"):
                flags += [a, argv[i + 1]]
        rendered = subprocess.run([str(HELM), "template", release, chart, *flags],
                                  check=True, capture_output=True, text=True).stdout
        tag = next(v.split("=", 1)[1] for v in values if v.startswith("image.tag="))
        assert f'image: "{component["image"]["repository"]}:{tag}"' in rendered


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({}, "source: Field required"),
        ({"components": [{"name": "Bad_Name"}]}, "components[0].name:"),
        ({"components": []}, "components: List should have at least 1 item"),
    ],
)
def test_config_errors_name_the_key(document, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(document)
    assert any(problem.startswith(expected) for problem in error.value.problems), error.value.problems


def test_unknown_component_is_bad_input(plan_repo, capsys):
    assert main(["plan", "--config", str(plan_repo), "--components", "nope"]) == 2
    assert "no component named 'nope'" in capsys.readouterr().err
