"""Package a component's Docker build context as a deterministic .tar.gz for BuildKit.

BuildKit downloads the archive from a presigned URL and never applies
`.dockerignore` to a remote context, so the filtering happens here. Layout:

    Dockerfile          the build's Dockerfile, whatever .dockerignore says
    context/...         the context after .dockerignore

which BuildKit reads with `--opt filename=Dockerfile --opt contextsubdir=context`.
The archive bytes depend only on file names, contents and executable bits, so
their sha256 serves as the component's context digest.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import stat
import struct
import tarfile
import tempfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel

from flows.dockerignore import DOCKERIGNORE, IgnoreFileError, choose_ignore_file, load_ignore_file, walk

ARCHIVE_DOCKERFILE = "Dockerfile"
ARCHIVE_CONTEXT_DIR = "context"

GZIP_LEVEL = 6
GZIP_CHUNK_BYTES = 1 << 20
LARGEST_PATHS_REPORTED = 10

_FILE_MODE = 0o644
_EXECUTABLE_MODE = 0o755
_DIR_MODE = 0o755
_SYMLINK_MODE = 0o777
_READ_BUFFER_BYTES = 1 << 20


class PackagingError(ValueError):
    """The context cannot be packaged; the message names the offending path."""


class PackagedContext(BaseModel, frozen=True):
    path: Path
    sha256: str
    bytes: int
    files: int
    dockerfile: str = ARCHIVE_DOCKERFILE
    contextsubdir: str = ARCHIVE_CONTEXT_DIR
    ignore_file: str = ""


@dataclass(frozen=True)
class ContextEntry:
    """One path of the filtered context, relative to the context root."""

    relpath: str
    kind: Literal["file", "dir", "symlink"]
    mode: int
    size: int = 0
    link_target: str = ""


def package_context(
    context_dir: Path, dockerfile: Path, out_dir: Path, *, max_bytes: int = 1 << 30
) -> PackagedContext:
    """Write `<out_dir>/<sha256>.tar.gz` for the context and return its description.

    Everything that can be refused (missing inputs, escaping symlinks, special
    files) is checked before out_dir is touched; an oversize archive is
    abandoned mid-stream and its temporary file removed.
    """
    context_dir, dockerfile, out_dir = Path(context_dir), Path(dockerfile), Path(out_dir)
    if not context_dir.is_dir():
        raise PackagingError(f"build context directory not found: {context_dir}")
    dockerfile_bytes = _read_dockerfile(dockerfile)
    entries = context_entries(context_dir, dockerfile=dockerfile, skip=_subtree_inside(out_dir, context_dir))

    out_dir.mkdir(parents=True, exist_ok=True)
    temp_path = _new_temp_file(out_dir)
    try:
        with temp_path.open("wb") as raw:
            measured = _MeasuredFile(raw, limit=max_bytes)
            try:
                _write_archive(measured, context_dir, dockerfile_bytes, entries)
            except _ArchiveTooLarge:
                raise _too_large_error(context_dir, entries, max_bytes) from None
        final_path = _publish(temp_path, out_dir / f"{measured.sha256}.tar.gz")
    finally:
        temp_path.unlink(missing_ok=True)

    return PackagedContext(
        path=final_path,
        sha256=measured.sha256,
        bytes=measured.bytes,
        files=sum(entry.kind != "dir" for entry in entries),
        ignore_file=os.fspath(choose_ignore_file(context_dir, dockerfile) or ""),
    )


def archive_paths(archive: Path) -> list[str]:
    """Sorted member names of a packaged archive (for `plan --list-files`)."""
    with tarfile.open(archive, "r:gz") as tar:
        return sorted(tar.getnames())


def context_entries(
    context_dir: Path, *, dockerfile: Path | None = None, skip: str | None = None
) -> list[ContextEntry]:
    """The context after the ignore file, sorted, directories before their contents.

    The ignore file is chosen, parsed, matched and walked as BuildKit does for a
    local context (see flows/dockerignore.py). `skip` is a relative path left out
    entirely (the output folder when it lives inside the context, so earlier
    archives don't leak into the next one).
    """
    included = _included_paths(context_dir, dockerfile)
    if skip is not None:
        included = _without_subtree(included, skip)
    return [_entry_for(context_dir, relpath) for relpath in sorted(included)]


def _without_subtree(paths: set[str], subtree: str) -> set[str]:
    """Drop `subtree`, its contents, and the parents that only existed to hold it.

    Creating out_dir creates its parents too; keeping them would make the
    first packaging differ from the next.
    """
    kept = {p for p in paths if p != subtree and not p.startswith(subtree + "/")}
    holders = {str(parent) for parent in Path(subtree).parents} - {"."}
    still_needed = {str(parent) for path in kept - holders for parent in Path(path).parents}
    return {p for p in kept if p not in holders or p in still_needed}


def _included_paths(context_dir: Path, dockerfile: Path | None) -> set[str]:
    """Relative paths BuildKit's filtered walk sends (kept paths and the directories holding them).

    Unlike docker-py's build, nothing keeps `.dockerignore` itself: BuildKit never
    sees ours, so, as with `docker buildx build` and COPY, the file follows its own
    patterns like any other.
    """
    try:
        _, matcher = load_ignore_file(context_dir, dockerfile)
    except IgnoreFileError as error:
        raise PackagingError(str(error)) from None
    try:
        return {path for path, _ in walk(context_dir, matcher)}
    except OSError as error:
        raise PackagingError(f"cannot read build context: {error}") from error


def _entry_for(context_dir: Path, relpath: str) -> ContextEntry:
    full_path = context_dir / relpath
    info = full_path.lstat()
    if stat.S_ISDIR(info.st_mode):
        return ContextEntry(relpath, "dir", _DIR_MODE)
    if stat.S_ISREG(info.st_mode):
        mode = _EXECUTABLE_MODE if info.st_mode & 0o111 else _FILE_MODE
        return ContextEntry(relpath, "file", mode, size=info.st_size)
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(full_path)
        _refuse_escaping_symlink(context_dir, relpath, target)
        return ContextEntry(relpath, "symlink", _SYMLINK_MODE, link_target=target)
    raise PackagingError(
        f"{full_path}: {_special_file_kind(info.st_mode)} cannot go into a build context; "
        f"remove it or add it to {DOCKERIGNORE}"
    )


def _refuse_escaping_symlink(context_dir: Path, relpath: str, target: str) -> None:
    """Refuse a symlink that leaves the context, both as written and as resolved.

    The written target matters once extracted under context/; the resolved one
    catches chains such as `a/b -> ..` plus `c -> a/b/..` that look harmless.
    """
    link = context_dir / relpath
    if os.path.isabs(target):
        raise PackagingError(f"{link}: symlink to absolute path {target!r} leaves the build context")
    lexical = os.path.normpath(os.path.join(os.path.dirname(relpath), target))
    root = os.path.realpath(context_dir)
    resolved = os.path.realpath(link)
    if lexical == ".." or lexical.startswith("../") or os.path.commonpath([root, resolved]) != root:
        raise PackagingError(f"{link}: symlink target {target!r} leaves the build context")


def _special_file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _read_dockerfile(dockerfile: Path) -> bytes:
    if not dockerfile.is_file():
        raise PackagingError(f"Dockerfile not found: {dockerfile}")
    return dockerfile.read_bytes()


def _subtree_inside(out_dir: Path, context_dir: Path) -> str | None:
    """out_dir relative to context_dir, or None when it lies outside."""
    out_real, root_real = out_dir.resolve(), context_dir.resolve()
    if out_real == root_real:
        raise PackagingError(f"output folder {out_dir} must not be the build context itself")
    if root_real not in out_real.parents:
        return None
    return out_real.relative_to(root_real).as_posix()


def _new_temp_file(out_dir: Path) -> Path:
    handle, name = tempfile.mkstemp(dir=out_dir, prefix=".package-", suffix=".part")
    os.close(handle)
    return Path(name)


def _publish(temp_path: Path, final_path: Path) -> Path:
    """Move the archive into place; an existing one has the same bytes, so keep it."""
    if not final_path.exists():
        temp_path.chmod(0o644)
        os.replace(temp_path, final_path)
    return final_path


def _write_archive(
    sink: BinaryIO, context_dir: Path, dockerfile_bytes: bytes, entries: list[ContextEntry]
) -> None:
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        gzip_stream = _ParallelGzipWriter(sink, pool, max_pending=2 * workers)
        with tarfile.open(
            fileobj=gzip_stream, mode="w", format=tarfile.PAX_FORMAT,
            copybufsize=_READ_BUFFER_BYTES,
        ) as tar:
            dockerfile_info = _tarinfo(ARCHIVE_DOCKERFILE, tarfile.REGTYPE, _FILE_MODE)
            dockerfile_info.size = len(dockerfile_bytes)
            tar.addfile(dockerfile_info, _BytesReader(dockerfile_bytes))
            tar.addfile(_tarinfo(ARCHIVE_CONTEXT_DIR, tarfile.DIRTYPE, _DIR_MODE))
            for entry in entries:
                _add_entry(tar, context_dir, entry)
        gzip_stream.close()


def _add_entry(tar: tarfile.TarFile, context_dir: Path, entry: ContextEntry) -> None:
    name = f"{ARCHIVE_CONTEXT_DIR}/{entry.relpath}"
    if entry.kind == "dir":
        tar.addfile(_tarinfo(name, tarfile.DIRTYPE, entry.mode))
    elif entry.kind == "symlink":
        info = _tarinfo(name, tarfile.SYMTYPE, entry.mode)
        info.linkname = entry.link_target
        tar.addfile(info)
    else:
        info = _tarinfo(name, tarfile.REGTYPE, entry.mode)
        info.size = entry.size
        try:
            with open(context_dir / entry.relpath, "rb") as source:
                tar.addfile(info, source)
        except OSError as error:
            raise PackagingError(f"cannot read {context_dir / entry.relpath}: {error}") from error


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    """A header carrying nothing of the machine that packaged it."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _BytesReader:
    def __init__(self, data: bytes):
        self._view = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        size = len(self._view) if size < 0 else size
        chunk, self._view = self._view[:size], self._view[size:]
        return bytes(chunk)


def _gzip_member(data: bytes) -> bytes:
    """One complete gzip member, header written by hand: mtime 0, no name, OS "unknown".

    zlib's own gzip header carries the OS it was built for, which would make
    the digest depend on where the packaging ran.
    """
    header = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x00\xff"
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(data) + compressor.flush()
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + body + trailer


class _ParallelGzipWriter:
    """Write-only stream that gzips fixed-size chunks on a thread pool, in order.

    Each chunk becomes its own gzip member; concatenated members are valid
    gzip (RFC 1952) and read as one stream by BuildKit, gzip and Python.
    Chunk boundaries depend only on byte offsets, so the output is the same
    whatever the number of threads. zlib releases the GIL while compressing.
    """

    def __init__(self, sink: BinaryIO, pool: ThreadPoolExecutor, *, max_pending: int):
        self._sink = sink
        self._pool = pool
        self._max_pending = max_pending
        self._pending: deque[Future[bytes]] = deque()
        self._buffer = bytearray()
        self._position = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        self._position += len(data)
        while len(self._buffer) >= GZIP_CHUNK_BYTES:
            chunk = bytes(self._buffer[:GZIP_CHUNK_BYTES])
            del self._buffer[:GZIP_CHUNK_BYTES]
            self._submit(chunk)
        return len(data)

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._buffer:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._sink.write(self._pending.popleft().result())

    def _submit(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(_gzip_member, chunk))
        while len(self._pending) > self._max_pending:
            self._sink.write(self._pending.popleft().result())


class _ArchiveTooLarge(Exception):
    pass


class _MeasuredFile:
    """Passes bytes through to a file while hashing and counting them, up to a limit."""

    def __init__(self, file: BinaryIO, *, limit: int):
        self._file = file
        self._limit = limit
        self._hash = hashlib.sha256()
        self.bytes = 0

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        if self.bytes > self._limit:
            raise _ArchiveTooLarge
        self._hash.update(data)
        return self._file.write(data)


def _too_large_error(
    context_dir: Path, entries: list[ContextEntry], max_bytes: int
) -> PackagingError:
    files = (entry for entry in entries if entry.kind == "file")
    largest = heapq.nlargest(LARGEST_PATHS_REPORTED, files, key=lambda entry: (entry.size, entry.relpath))
    listing = "\n".join(f"  {_human_size(entry.size):>10}  {entry.relpath}" for entry in largest)
    return PackagingError(
        f"build context {context_dir} packs to more than {max_bytes} bytes "
        f"({_human_size(max_bytes)}); largest files, candidates for {DOCKERIGNORE}:\n{listing}"
    )


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
