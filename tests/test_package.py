"""flows.package against real files: archive layout, .dockerignore, determinism, refusals."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from flows.package import (
    ARCHIVE_CONTEXT_DIR,
    ARCHIVE_DOCKERFILE,
    GZIP_CHUNK_BYTES,
    PackagedContext,
    PackagingError,
    archive_paths,
    package_context,
)

DOCKERFILE_TEXT = "FROM python:3.12-slim\nCOPY . /app\n"


def write(root: Path, relpath: str, content: str | bytes = "x\n", mode: int | None = None) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    if mode is not None:
        path.chmod(mode)
    return path


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        return {info.name: info for info in tar.getmembers()}


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(name).read()


def context_paths(archive: Path) -> set[str]:
    prefix = ARCHIVE_CONTEXT_DIR + "/"
    return {name[len(prefix):] for name in members(archive) if name.startswith(prefix)}


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


# --- layout ---------------------------------------------------------------------------


def test_dockerfile_at_root_and_context_under_context_dir(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)
    write(ctx, "app/main.py", "print('hi')\n")
    (ctx / "empty").mkdir()

    result = package_context(ctx, ctx / "Dockerfile", out_dir)

    assert isinstance(result, PackagedContext)
    assert (result.dockerfile, result.contextsubdir) == (ARCHIVE_DOCKERFILE, ARCHIVE_CONTEXT_DIR)
    assert result.path == out_dir / f"{result.sha256}.tar.gz"
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert result.bytes == result.path.stat().st_size
    assert result.files == 2
    assert archive_paths(result.path) == [
        "Dockerfile",
        "context",
        "context/Dockerfile",
        "context/app",
        "context/app/main.py",
        "context/empty",
    ]
    assert list(members(result.path)) == archive_paths(result.path), "entries stored sorted"
    assert read_member(result.path, "Dockerfile").decode() == DOCKERFILE_TEXT
    assert read_member(result.path, "context/app/main.py") == b"print('hi')\n"
    assert members(result.path)["context/empty"].isdir()
    assert list(out_dir.iterdir()) == [result.path]


def test_dockerignore_excluding_dockerfile_itself_and_tests_keeps_root_dockerfile(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)
    write(ctx, "Dockerfile.dev", "FROM scratch\n")
    write(ctx, ".dockerignore", "Dockerfile*\n.dockerignore\ntests/\n")
    write(ctx, "tests/test_app.py")
    write(ctx, "tests/fixtures/data.json")
    write(ctx, "app/main.py")

    result = package_context(ctx, ctx / "Dockerfile", out_dir)

    assert read_member(result.path, ARCHIVE_DOCKERFILE).decode() == DOCKERFILE_TEXT
    assert context_paths(result.path) == {"app", "app/main.py"}
    assert result.files == 1


def test_dockerfile_outside_the_context(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "src/lib.py")
    dockerfile = write(tmp_path / "docker", "api.Dockerfile", DOCKERFILE_TEXT)

    result = package_context(ctx, dockerfile, out_dir)

    assert read_member(result.path, "Dockerfile").decode() == DOCKERFILE_TEXT
    assert context_paths(result.path) == {"src", "src/lib.py"}


def test_output_folder_inside_the_context_is_not_packaged(tmp_path):
    ctx = tmp_path / "ctx"
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)
    write(ctx, "app/main.py")
    out_dir = ctx / "app" / ".build" / "contexts"

    first = package_context(ctx, ctx / "Dockerfile", out_dir)
    second = package_context(ctx, ctx / "Dockerfile", out_dir)

    assert first == second
    assert context_paths(second.path) == {"Dockerfile", "app", "app/main.py"}


# --- .dockerignore (the full table ported from upstream is tests/test_dockerignore.py) ----

IGNORE_TREE = [
    "Dockerfile.dev",
    "app/main.py",
    "app/util.pyc",
    "app/__pycache__/main.cpython-311.pyc",
    "build/out.bin",
    "build/keep/important.txt",
    "build/keep/other.txt",
    "docs/README.md",
    "docs/guide/intro.md",
    "node_modules/pkg/index.js",
    "secret.env",
    "src/build/gen.txt",
    "tests/test_app.py",
    ".git/HEAD",
]

IGNORE_CASES = {
    "double-star pyc": (
        ["**/*.pyc"],
        {"app/main.py", "app/__pycache__"},
        {"app/util.pyc", "app/__pycache__/main.cpython-311.pyc"},
    ),
    "leading slash anchors at root": (
        ["/build"],
        {"src/build/gen.txt"},
        {"build", "build/out.bin", "build/keep/important.txt"},
    ),
    "trailing slash": (
        ["build/", "docs/guide/"],
        {"src/build/gen.txt", "docs/README.md"},
        {"build/out.bin", "docs/guide/intro.md"},
    ),
    "re-include a file inside an excluded folder": (
        ["build", "!build/keep/important.txt"],
        {"build/keep/important.txt"},
        {"build/out.bin", "build/keep/other.txt"},
    ),
    "re-include a folder inside an excluded folder": (
        ["docs", "!docs/guide"],
        {"docs/guide/intro.md"},
        {"docs/README.md"},
    ),
    "exclude everything but one folder": (
        ["*", "!app"],
        {"app/main.py", "app/util.pyc"},
        {"secret.env", "build/out.bin", "tests/test_app.py", ".git/HEAD"},
    ),
    "comments, blank lines, surrounding spaces": (
        ["# secrets", "", "  *.env  ", "#node_modules", "  node_modules"],
        {"app/main.py"},
        {"secret.env", "node_modules/pkg/index.js"},
    ),
    "exception then re-exclusion, last match wins": (
        ["build", "!build/keep", "build/keep/other.txt"],
        {"build/keep/important.txt"},
        {"build/keep/other.txt", "build/out.bin"},
    ),
    "dockerfile variants and dot folders": (
        ["Dockerfile*", ".git", "tests/**"],
        {"app/main.py"},
        {"Dockerfile.dev", ".git/HEAD", "tests/test_app.py"},
    ),
    "double star in the middle": (
        ["**/__pycache__", "src/**/gen.txt"],
        {"app/util.pyc"},
        {"app/__pycache__/main.cpython-311.pyc", "src/build/gen.txt"},
    ),
}


@pytest.mark.parametrize("case", IGNORE_CASES, ids=list(IGNORE_CASES))
def test_dockerignore_cases(tmp_path, out_dir, case):
    patterns, must_keep, must_drop = IGNORE_CASES[case]
    ctx = tmp_path / "ctx"
    for relpath in IGNORE_TREE:
        write(ctx, relpath)
    write(ctx, ".dockerignore", "\n".join(patterns) + "\n")
    dockerfile = write(tmp_path, "Dockerfile", DOCKERFILE_TEXT)

    packaged = context_paths(package_context(ctx, dockerfile, out_dir).path)

    assert must_keep <= packaged
    assert not must_drop & packaged


def test_dockerignore_with_byte_order_mark(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "secret.env")
    write(ctx, "app.py")
    write(ctx, ".dockerignore", "\ufeffsecret.env\n".encode())

    result = package_context(ctx, write(tmp_path, "Dockerfile", DOCKERFILE_TEXT), out_dir)

    assert context_paths(result.path) == {"app.py", ".dockerignore"}


def test_special_files_inside_excluded_folder_are_not_visited(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "app.py")
    (ctx / "run").mkdir()
    os.mkfifo(ctx / "run" / "events.fifo")
    write(ctx, ".dockerignore", "run\n")

    result = package_context(ctx, write(tmp_path, "Dockerfile", DOCKERFILE_TEXT), out_dir)

    assert context_paths(result.path) == {"app.py", ".dockerignore"}


# --- determinism ---------------------------------------------------------------------


def build_tree(root: Path, *, mtime: int, reverse: bool = False) -> Path:
    files = {
        "Dockerfile": (DOCKERFILE_TEXT, 0o644),
        "app/main.py": ("print('main')\n", 0o600),
        "app/run.sh": ("#!/bin/sh\nexec python main.py\n", 0o700),
        "lib/a/b/deep.txt": ("deep\n", 0o664),
        "z" * 120 + "/long_name.txt": ("long\n", 0o644),
    }
    for relpath, (content, mode) in sorted(files.items(), reverse=reverse):
        write(root, relpath, content, mode)
    (root / "empty").mkdir(mode=0o700)
    os.symlink("app/main.py", root / "main_link")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def test_same_tree_in_different_folders_and_times_gives_same_digest(tmp_path):
    old_umask = os.umask(0o077)
    try:
        first_root = build_tree(tmp_path / "checkout-one" / "svc", mtime=1_000_000)
    finally:
        os.umask(old_umask)
    second_root = build_tree(tmp_path / "elsewhere" / "svc", mtime=1_700_000_000, reverse=True)

    first = package_context(first_root, first_root / "Dockerfile", tmp_path / "out1")
    second = package_context(second_root, second_root / "Dockerfile", tmp_path / "out2")

    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.name == second.path.name


def test_archive_headers_carry_no_host_details(tmp_path, out_dir):
    root = build_tree(tmp_path / "svc", mtime=1_700_000_000)

    result = package_context(root, root / "Dockerfile", out_dir)

    raw = result.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert raw[3] & 0x08 == 0, "gzip header must not carry a file name"
    assert raw[4:8] == b"\x00\x00\x00\x00", "gzip header mtime must be 0"
    for info in members(result.path).values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")


def test_one_changed_byte_changes_digest(tmp_path):
    first_root = build_tree(tmp_path / "a", mtime=1_000_000)
    second_root = build_tree(tmp_path / "b", mtime=1_000_000)
    write(second_root, "lib/a/b/deep.txt", "deeP\n", 0o664)

    first = package_context(first_root, first_root / "Dockerfile", tmp_path / "out")
    second = package_context(second_root, second_root / "Dockerfile", tmp_path / "out")

    assert first.sha256 != second.sha256
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_executable_bit_kept_and_modes_normalised(tmp_path, out_dir):
    root = build_tree(tmp_path / "svc", mtime=1_000_000)

    entries = members(package_context(root, root / "Dockerfile", out_dir).path)

    assert entries["context/app/run.sh"].mode == 0o755
    assert entries["context/app/main.py"].mode == 0o644
    assert entries["context/lib/a/b/deep.txt"].mode == 0o644
    assert entries["context/empty"].mode == 0o755
    assert entries["Dockerfile"].mode == 0o644


def test_repackaging_reuses_existing_archive(tmp_path, out_dir):
    root = build_tree(tmp_path / "svc", mtime=1_000_000)

    first = package_context(root, root / "Dockerfile", out_dir)
    inode = first.path.stat().st_ino
    second = package_context(root, root / "Dockerfile", out_dir)

    assert second == first
    assert second.path.stat().st_ino == inode
    assert list(out_dir.iterdir()) == [first.path]


def test_large_file_spanning_several_gzip_members_round_trips(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    payload = os.urandom(GZIP_CHUNK_BYTES * 3 + 12345)
    write(ctx, "blob.bin", payload)
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)

    result = package_context(ctx, ctx / "Dockerfile", out_dir)

    assert read_member(result.path, "context/blob.bin") == payload
    assert len(gzip.decompress(result.path.read_bytes())) % 512 == 0


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_system_tar_reads_the_archive(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "blob.bin", os.urandom(GZIP_CHUNK_BYTES * 2))
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)

    result = package_context(ctx, ctx / "Dockerfile", out_dir)

    listed = subprocess.run(
        ["tar", "-tzf", str(result.path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert sorted(name.rstrip("/") for name in listed) == archive_paths(result.path)


# --- symlinks and refusals -------------------------------------------------------------


def test_symlinks_inside_the_context_are_kept_as_symlinks(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "config/settings.toml")
    write(ctx, "app/main.py")
    os.symlink("../config/settings.toml", ctx / "app" / "settings.toml")
    os.symlink("config", ctx / "conf")

    result = package_context(ctx, write(tmp_path, "Dockerfile", DOCKERFILE_TEXT), out_dir)

    entries = members(result.path)
    assert entries["context/app/settings.toml"].issym()
    assert entries["context/app/settings.toml"].linkname == "../config/settings.toml"
    assert entries["context/conf"].issym()
    assert "context/conf/settings.toml" not in entries
    assert result.files == 4


def escaping_relative(ctx: Path) -> str:
    os.symlink("../../etc/passwd", ctx / "app" / "passwd")
    return "app/passwd"


def escaping_absolute(ctx: Path) -> str:
    os.symlink(str(ctx / "app" / "main.py"), ctx / "absolute")
    return "absolute"


def escaping_through_another_link(ctx: Path) -> str:
    os.symlink("..", ctx / "app" / "up")
    os.symlink("app/up/..", ctx / "sneaky")
    return "sneaky"


def fifo(ctx: Path) -> str:
    os.mkfifo(ctx / "app" / "pipe")
    return "app/pipe"


@pytest.mark.parametrize(
    "make_bad_path", [escaping_relative, escaping_absolute, escaping_through_another_link, fifo]
)
def test_refused_paths_are_named_and_nothing_is_written(tmp_path, out_dir, make_bad_path):
    ctx = tmp_path / "ctx"
    write(ctx, "app/main.py")
    bad_relpath = make_bad_path(ctx)

    with pytest.raises(PackagingError) as raised:
        package_context(ctx, write(tmp_path, "Dockerfile", DOCKERFILE_TEXT), out_dir)

    assert str(ctx / bad_relpath) in str(raised.value)
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_oversize_archive_names_largest_files_and_leaves_nothing(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "Dockerfile", DOCKERFILE_TEXT)
    for index in range(12):
        write(ctx, f"data/blob{index:02}.bin", os.urandom(10_000 + index * 1_000))

    with pytest.raises(PackagingError) as raised:
        package_context(ctx, ctx / "Dockerfile", out_dir, max_bytes=50_000)

    message = str(raised.value)
    assert "50000" in message
    for index in range(2, 12):
        assert f"data/blob{index:02}.bin" in message
    assert "data/blob00.bin" not in message and "data/blob01.bin" not in message
    assert "20.5 KiB" in message
    assert list(out_dir.iterdir()) == []


def test_missing_context_dir_is_named(tmp_path, out_dir):
    missing = tmp_path / "no-such-dir"

    with pytest.raises(PackagingError, match="no-such-dir"):
        package_context(missing, write(tmp_path, "Dockerfile", DOCKERFILE_TEXT), out_dir)
    assert not out_dir.exists()


def test_missing_dockerfile_is_named(tmp_path, out_dir):
    ctx = tmp_path / "ctx"
    write(ctx, "app.py")

    with pytest.raises(PackagingError, match="Dockerfile.prod"):
        package_context(ctx, ctx / "Dockerfile.prod", out_dir)
    assert not out_dir.exists()
