"""Source stage: the application repository checked out at one exact commit.

Checkouts live in a cache reused across runs: one bare-ish clone per repository
and one read-only worktree per commit, so concurrent runs on different refs
never disturb each other and a rerun of the same commit fetches nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

import git
from pydantic import BaseModel, ConfigDict

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")


class SourceError(RuntimeError):
    """The repository or ref cannot be checked out."""


class SourceCheckout(BaseModel):
    model_config = ConfigDict(frozen=True)

    repo: str
    ref: str
    commit: str
    path: Path
    dirty: bool = False


def default_cache_dir() -> Path:
    root = os.environ.get("BUILDKIT_PIPELINE_CACHE") or Path.home() / ".cache" / "buildkit-pipeline"
    return Path(root) / "sources"


def resolve_repo(repo: str, base_dir: Path) -> str:
    """A git URL stays as it is; a local path becomes a file:// URL (so fetches can be shallow)."""
    if "://" in repo or SCP_LIKE.match(repo):
        return repo
    return (base_dir / repo).resolve().as_uri()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch(repository: git.Repo, ref: str) -> str:
    """Fetch just what `ref` needs and return its commit SHA."""
    if FULL_SHA.match(ref):
        try:
            repository.commit(ref)
            return ref
        except (ValueError, git.BadName):
            pass
    try:
        repository.git.fetch("--depth=1", "--no-tags", "origin", ref)
    except git.GitCommandError as exc:
        if not FULL_SHA.match(ref):
            raise SourceError(f"cannot fetch ref {ref!r}: {exc.stderr.strip()}") from None
        try:
            repository.git.fetch("--no-tags", "origin")
            repository.commit(ref)
            return ref
        except (git.GitCommandError, ValueError) as retry:
            raise SourceError(f"commit {ref} is not in the repository: {retry}") from None
    return repository.git.rev_parse("FETCH_HEAD^{commit}")


def checkout(repo: str, ref: str, cache_dir: Path | None = None) -> SourceCheckout:
    """Check out `ref` of `repo` (a URL, see resolve_repo) into the cache; return the exact commit."""
    cache_dir = cache_dir or default_cache_dir()
    key = hashlib.sha256(repo.encode()).hexdigest()[:16]
    clone_dir = cache_dir / key / "repo"
    with _locked(cache_dir / key / "lock"):
        if (clone_dir / ".git").exists():
            repository = git.Repo(clone_dir)
        else:
            repository = git.Repo.init(clone_dir)
            repository.create_remote("origin", repo)
        commit = _fetch(repository, ref)
        tree = cache_dir / key / "trees" / commit
        if not tree.exists():
            repository.git.worktree("prune")
            repository.git.worktree("add", "--detach", "--force", str(tree), commit)
    return SourceCheckout(repo=repo, ref=ref, commit=commit, path=tree)
