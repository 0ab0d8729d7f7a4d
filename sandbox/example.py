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
