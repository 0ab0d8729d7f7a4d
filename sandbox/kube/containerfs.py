"""The filesystem a container sees, as far as creating, replacing and writing files goes.

The kubelet puts mounts into the container's filesystem: the termination-message file and every volumeMount.
kubernetes/kubernetes pkg/kubelet/kuberuntime/kuberuntime_container.go `makeMounts` (v1.33) creates a host file,
chmods it 0666 and bind-mounts it at `terminationMessagePath`; after the container exits the kubelet reads what the
container wrote there (at most the last 4096 bytes, `kubecontainer.MaxContainerTerminationMessageLength`).

What the kernel refuses (torvalds/linux fs/namei.c `may_create`/`may_delete`/`vfs_rename`, v6.x):
- creating a file in a directory the process may not write: EACCES (root, uid 0, may write anywhere);
- replacing or removing a file in a sticky directory (/tmp) that neither the process nor the directory owns: EPERM;
- renaming onto or away from a mount point: EBUSY (`is_local_mountpoint`), checked after the permissions;
- writing to a read-only mount: EROFS.

The image's own directories (who owns them, their modes) and its user come from the builder that knows the image.
Errors are `OSError(errno, strerror, path[, path2])`; each program prints them in its own words.
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass

MAX_TERMINATION_MESSAGE = 4096
HOST_FILE_MODE = 0o666  # makeMounts: os.Chmod(containerLogPath, 0666)


@dataclass(frozen=True)
class Node:
    owner: int = 0
    mode: int = 0o755
    directory: bool = True


def go_strerror(code: int) -> str:
    """Go's text for an errno (syscall zerrors_linux_*.go): glibc's, starting lowercase."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


def _error(code: int, path: str, path2: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), path, None, path2)


class ContainerFS:
    """The container's view: `nodes` by absolute path, file contents, the mount points, the read-only ones."""

    def __init__(self, uid: int, nodes: dict[str, Node], termination_path: str) -> None:
        self.uid = uid
        self.nodes: dict[str, Node] = {"/": Node()}
        self.contents: dict[str, bytes] = {}
        self.mount_points: set[str] = set()
        self.read_only: set[str] = set()
        self.termination_path = termination_path
        for path, node in nodes.items():
            self._add(path, node)

    @classmethod
    def for_container(cls, pod: dict, container: dict, image_nodes: dict[str, Node], image_uid: int = 0
                      ) -> ContainerFS:
        """The image's directories plus what the kubelet mounts, as the container's user sees them."""
        security = container.get("securityContext") or {}
        pod_security = (pod.get("spec") or {}).get("securityContext") or {}
        uid = security.get("runAsUser", pod_security.get("runAsUser", image_uid))
        termination = container.get("terminationMessagePath") or "/dev/termination-log"
        fs = cls(uid, image_nodes, termination)
        fs._mount(termination, Node(0, HOST_FILE_MODE, directory=False), read_only=False)
        for mount in container.get("volumeMounts") or []:
            # a subPath mount of a Secret key is a file; anything else a directory (emptyDir: 0777)
            node = Node(0, 0o644, directory=False) if mount.get("subPath") else Node(0, 0o777)
            fs._mount(mount["mountPath"], node, read_only=bool(mount.get("readOnly")))
        return fs

    # ---------------------------------------------------------------- building

    def _add(self, path: str, node: Node) -> None:
        path = posixpath.normpath(path)
        parent = posixpath.dirname(path)
        if parent not in self.nodes:  # a runtime creates missing mount-point parents as root, 0755
            self._add(parent, Node())
        self.nodes[path] = node
        if not node.directory:
            self.contents.setdefault(path, b"")

    def _mount(self, path: str, node: Node, *, read_only: bool) -> None:
        path = posixpath.normpath(path)
        self._add(path, node)
        self.mount_points.add(path)
        if read_only:
            self.read_only.add(path)

    # ---------------------------------------------------------------- the checks

    def _read_only(self, path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in self.read_only)

    def _may_write(self, node: Node) -> bool:
        if self.uid == 0:
            return True
        return bool(node.mode & (0o200 if node.owner == self.uid else 0o002))

    def _directory(self, path: str) -> tuple[str, Node]:
        directory = posixpath.dirname(path)
        node = self.nodes.get(directory)
        if node is None or not node.directory:
            raise _error(errno.ENOENT if node is None else errno.ENOTDIR, path)
        return directory, node

    def _may_create(self, path: str) -> None:
        directory, node = self._directory(path)
        if self._read_only(directory):
            raise _error(errno.EROFS, path)
        if not self._may_write(node):
            raise _error(errno.EACCES, path)

    def _may_delete(self, path: str) -> None:
        self._may_create(path)
        _, directory = self._directory(path)
        victim = self.nodes.get(path)
        sticky = directory.mode & 0o1000
        if sticky and victim and self.uid not in (0, victim.owner, directory.owner):
            raise _error(errno.EPERM, path)

    # ---------------------------------------------------------------- what programs do

    def exists(self, path: str) -> bool:
        return posixpath.normpath(path) in self.nodes

    def read(self, path: str) -> bytes:
        path = posixpath.normpath(path)
        node = self.nodes.get(path)
        if node is None:
            raise _error(errno.ENOENT, path)
        if node.directory:
            raise _error(errno.EISDIR, path)
        if not (self.uid == 0 or node.mode & (0o400 if node.owner == self.uid else 0o004)):
            raise _error(errno.EACCES, path)
        return self.contents[path]

    def create_exclusive(self, path: str, mode: int = 0o600) -> None:
        """open(path, O_RDWR|O_CREAT|O_EXCL, mode)."""
        path = posixpath.normpath(path)
        if path in self.nodes:
            raise _error(errno.EEXIST, path)
        self._may_create(path)
        self.nodes[path] = Node(self.uid, mode, directory=False)
        self.contents[path] = b""

    def write(self, path: str, data: bytes, *, append: bool = False) -> None:
        """open(path, O_WRONLY|O_CREAT|O_TRUNC (or O_APPEND), 0666) and write: a plain write, fine on a mount."""
        path = posixpath.normpath(path)
        node = self.nodes.get(path)
        if node is None:
            self._may_create(path)
            node = self.nodes[path] = Node(self.uid, 0o644, directory=False)
            self.contents[path] = b""
        elif node.directory:
            raise _error(errno.EISDIR, path)
        elif self._read_only(path):
            raise _error(errno.EROFS, path)
        elif not self._may_write(node):
            raise _error(errno.EACCES, path)
        self.contents[path] = (self.contents[path] if append else b"") + data

    def chmod(self, path: str, mode: int) -> None:
        path = posixpath.normpath(path)
        node = self.nodes[path]
        if self.uid not in (0, node.owner):
            raise _error(errno.EPERM, path)
        self.nodes[path] = Node(node.owner, mode, node.directory)

    def rename(self, old: str, new: str) -> None:
        """rename(2): permissions on both directories first, then a mount point on either side is EBUSY."""
        old, new = posixpath.normpath(old), posixpath.normpath(new)
        if old not in self.nodes:
            raise _error(errno.ENOENT, old, new)
        try:
            self._may_delete(old)
            self._may_delete(new) if new in self.nodes else self._may_create(new)
        except OSError as exc:
            raise _error(exc.errno, old, new) from None
        if old in self.mount_points or new in self.mount_points:
            raise _error(errno.EBUSY, old, new)
        self.nodes[new] = self.nodes.pop(old)
        self.contents[new] = self.contents.pop(old, b"")

    def termination_message(self) -> str:
        """What the kubelet reports as the container's termination message (policy File)."""
        data = self.contents.get(posixpath.normpath(self.termination_path), b"")
        return data[-MAX_TERMINATION_MESSAGE:].decode(errors="replace")
