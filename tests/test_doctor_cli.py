"""`buildkit-pipeline doctor` as operators run it from a shell: `--json`, exit codes, `--sandbox` as `make demo` runs
it. The served `doctor` deployment is run in tests/test_operations.py, next to the other served deployments."""

from __future__ import annotations

import json

from flows.cli import main
from sandbox.example import commit_all


def test_a_pipeline_file_that_does_not_load_exits_2_before_any_check(tmp_path, capsys):
    broken = tmp_path / "buildkit-pipeline.yaml"
    broken.write_text("source: {repo: .}\nregistry: 123456789012.dkr.ecr.us-west-2.amazonaws.com\n")

    assert main(["doctor", "--config", str(broken)]) == 2
    captured = capsys.readouterr()
    assert "error: " in captured.err and "aws" in captured.err and captured.out == ""


def test_doctor_sandbox_exits_1_for_a_failing_check_and_prints_json_with_its_fix(prefect_server, example_app,
                                                                                capsys):
    """`--sandbox` prepares a sandbox of its own, as `make demo` does; a builder image on a moving tag fails one
    check and only that one."""
    app = example_app
    app.pipeline_file.write_text(app.pipeline_file.read_text().replace(
        "image: moby/buildkit:v0.31.2", "image: moby/buildkit:master"))
    commit_all(app.root, "a builder image on a moving tag")

    assert main(["doctor", "--config", str(app.pipeline_file), "--sandbox", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    failed = [check for check in report["checks"] if check["status"] == "fail"]
    assert report["ok"] is False
    assert [check["check"] for check in failed] == ["pipeline.images-pinned"]
    assert "moby/buildkit:master" in failed[0]["found"] and "build.image: moby/buildkit:v" in failed[0]["fix"]
    groups = {check["check"].partition(".")[0] for check in report["checks"]}
    assert groups == {"pipeline", "aws", "ecr", "cluster", "nodes", "prefect"}
    assert all(check["status"] == "pass" for check in report["checks"]
               if check["check"].partition(".")[0] in ("aws", "ecr", "cluster", "nodes"))
