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
from urllib.parse import unquote, urlsplit, urlunsplit

import git
from pydantic import BaseModel, ConfigDict

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
# git/git refs.c (v2.39.5) refname_disposition: ASCII control characters, DEL, space, ~ ^ : ? [ \ and the
# refspec pattern * are never part of a ref name.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]*@")


class SourceError(RuntimeError):
    """The repository or ref cannot be checked out."""


class SourceCheckout(BaseModel):
    model_config = ConfigDict(frozen=True)

    repo: str
    ref: str
    commit: str
    path: Path
    dirty: bool = False


def cache_root() -> Path:
    """Where checkouts and archives are kept between runs (`$BUILDKIT_PIPELINE_CACHE`)."""
    return Path(os.environ.get("BUILDKIT_PIPELINE_CACHE") or Path.home() / ".cache" / "buildkit-pipeline")


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


def ref_problem(ref: str) -> str | None:
    """Why `ref` is not a branch, tag or full commit SHA that git can be asked for safely; None when it is.

    A name must pass `git check-ref-format --allow-onelevel` (git/git refs.c
    check_refname_format, v2.39.5) and must not start with `-`: git reads such an
    argument as an option, and `--upload-pack=<command>` runs the command.
    """
    if FULL_SHA.match(ref):
        return None
    if not ref:
        return "is empty"
    if ref.startswith("-"):
        return "starts with '-'"
    if ref == "@":
        return "is '@'"
    if found := _REF_FORBIDDEN.search(ref):
        return f"contains {found[0]!r}"
    for sequence in ("..", "@{"):
        if sequence in ref:
            return f"contains {sequence!r}"
    for component in ref.split("/"):
        if not component:
            return "has an empty path component (a leading, trailing or double '/')"
        if component.startswith("."):
            return f"has a path component starting with '.' ({component!r})"
        if component.endswith(".lock"):
            return f"has a path component ending in '.lock' ({component!r})"
    if ref.endswith("."):
        return "ends with '.'"
    return None


def check_ref(ref: str) -> str:
    """`ref` itself, or a SourceError saying why git must not be asked for it."""
    if problem := ref_problem(ref):
        raise SourceError(f"ref {ref!r} is not a branch, tag or commit SHA: it {problem}")
    return ref


def without_userinfo(text: str) -> str:
    """`text` with the user and password (a token, often) taken out of every URL in it."""
    return _USERINFO.sub(r"\g<scheme>", text)


def _git_error(exc: git.GitCommandError, repo: str) -> str:
    message = str(exc.stderr or exc).strip().removeprefix("stderr:").strip().strip("'").strip()
    return without_userinfo(message.replace(repo, public_url(repo)))


def _fetch(repository: git.Repo, repo: str, ref: str) -> str:
    """Fetch just what `ref` needs and return its commit SHA.

    `--end-of-options` (git parse-options.c, v2.39.5) makes git read `ref` as a
    ref whatever it looks like; `check_ref` has refused option-like refs already.
    """
    if FULL_SHA.match(ref):
        try:
            repository.commit(ref)
            return ref
        except (ValueError, git.BadName):
            pass
    try:
        repository.git.fetch("--depth=1", "--no-tags", "--end-of-options", "origin", ref)
    except git.GitCommandError as exc:
        if not FULL_SHA.match(ref):
            raise SourceError(f"cannot fetch ref {ref!r} from {public_url(repo)}: {_git_error(exc, repo)}") from None
        try:
            repository.git.fetch("--no-tags", "--end-of-options", "origin")
            repository.commit(ref)
            return ref
        except (git.GitCommandError, ValueError):
            raise SourceError(f"commit {ref} is not in {public_url(repo)}") from None
    return repository.git.rev_parse("FETCH_HEAD^{commit}")


def public_url(repo: str) -> str:
    """The repository URL without its user and password, fit for labels, logs and errors.

    `https://<token>@host/...` carries the token as the user name, so the whole
    userinfo goes, not only a password; so does the user of `user@host:path`.
    """
    parts = urlsplit(repo)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if not parts.scheme and SCP_LIKE.match(repo):
        return repo.partition("@")[2]
    return repo


def _dirty_worktree(repo: str, ref: str) -> SourceCheckout | None:
    """A local working tree with uncommitted changes, when `ref` is what it has checked out.

    Building it as it is lets a developer try a change before committing it; the
    result is marked dirty (in the plan, the image tag and the image labels).
    A clean tree is cloned like any other repository.
    """
    if not repo.startswith("file://"):
        return None
    try:
        local = git.Repo(Path(unquote(urlsplit(repo).path)))
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    if local.bare or not local.is_dirty(untracked_files=True):
        return None
    head = local.head.commit.hexsha
    branch = None if local.head.is_detached else local.active_branch.name
    if ref not in (branch, head, "HEAD"):
        return None
    return SourceCheckout(repo=repo, ref=ref, commit=head, path=Path(local.working_tree_dir), dirty=True)


def refuse_dirty_in_deployment(dirty: SourceCheckout) -> SourceCheckout:
    """A run started from a deployment (`prefect.runtime.deployment.id`) builds commits only.

    Uncommitted changes on a worker are nobody's reviewed change, and the image would
    carry a commit SHA that does not describe it. Interactive runs still build them.
    """
    from prefect.runtime import deployment

    if not deployment.id:
        return dirty
    changed = git.Repo(dirty.path).git.status("--porcelain", "--untracked-files=all").splitlines()
    shown = ", ".join(line[3:] for line in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    raise SourceError(
        f"source.repo: {dirty.path} has uncommitted changes ({shown}) on {dirty.ref!r}, which a deployment run "
        f"does not build: commit them, or discard them (git -C {dirty.path} stash -u); "
        f"`buildkit-pipeline run` outside a deployment still builds a dirty tree")


def checkout(repo: str, ref: str, cache_dir: Path | None = None) -> SourceCheckout:
    """Check out `ref` of `repo` (a URL, see resolve_repo) into the cache; return the exact commit.

    The checkout names the repository by its public URL only: whatever holds it
    (image labels, the plan, logs) never sees a token.
    """
    check_ref(ref)
    if dirty := _dirty_worktree(repo, ref):
        return refuse_dirty_in_deployment(dirty)
    cache_dir = cache_dir or cache_root() / "sources"
    key = hashlib.sha256(repo.encode()).hexdigest()[:16]
    clone_dir = cache_dir / key / "repo"
    with _locked(cache_dir / key / "lock"):
        if (clone_dir / ".git").exists():
            repository = git.Repo(clone_dir)
        else:
            repository = git.Repo.init(clone_dir)
            try:
                repository.create_remote("origin", repo)
            except git.GitCommandError as exc:
                raise SourceError(f"cannot use {public_url(repo)} as a git remote: {_git_error(exc, repo)}") from None
        commit = _fetch(repository, repo, ref)
        tree = cache_dir / key / "trees" / commit
        if not tree.exists():
            repository.git.worktree("prune")
            repository.git.worktree("add", "--detach", "--force", str(tree), commit)
    return SourceCheckout(repo=public_url(repo), ref=ref, commit=commit, path=tree)
