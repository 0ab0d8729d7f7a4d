"""The example application as a real git repository, so the source stage clones it for real."""

from __future__ import annotations

import shutil
from pathlib import Path

import git

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "weather-app"
PIPELINE_FILE = "buildkit-pipeline.yaml"
AUTHOR = git.Actor("Example Developer", "dev@example.com")


def create_example_repo(dest: Path, source: Path = EXAMPLE) -> Path:
    """Copy the example into `dest`, commit it on `main`, and return the pipeline file's path."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    repo = git.Repo.init(dest, initial_branch="main")
    commit_all(repo, "Example application")
    return dest / PIPELINE_FILE


def commit_all(repo: git.Repo | Path, message: str) -> str:
    repo = repo if isinstance(repo, git.Repo) else git.Repo(repo)
    repo.git.add("--all")
    repo.index.commit(message, author=AUTHOR, committer=AUTHOR)
    return repo.head.commit.hexsha


def add_agent(pipeline_file: Path, name: str) -> None:
    """Add and commit a second agent built like `weather-agent`: its own context folder, values file and
    release in `agents`, deployed after `weather-mcp`."""
    root = pipeline_file.parent
    shutil.copytree(root / "agents/weather/agent", root / f"agents/{name}")
    shutil.copy(root / "manifests/helm/values/weather-agent.yaml", root / f"manifests/helm/values/{name}.yaml")
    text = pipeline_file.read_text()
    agent_entry = text[text.index("  - name: weather-agent"):]
    pipeline_file.write_text(text + agent_entry.replace("weather-agent", name).replace("agents/weather/agent",
                                                                                       f"agents/{name}"))
    commit_all(root, f"Add {name}")
