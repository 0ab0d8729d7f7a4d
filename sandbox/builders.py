"""What the simulated builders (sandbox/buildkit.py, sandbox/kaniko.py) share: reading the files a Secret volume
mounts into the build container, the ECR token they compare the mounted one with, the layers and manifest of the
image a Dockerfile makes, and pushing that manifest to the sandbox ECR.

An image has one layer per filesystem-changing instruction (the base image's, then one per RUN, COPY and ADD of
the final stage). Sizes come from the context alone: a COPY/ADD layer is the gzip of the files it copies, a RUN
layer's size is drawn from a hash of everything before it, the base layer's from the base image's name. Layer
digests also hash the builder's name, so the two builders push different digests for the same context, as real
ones do. The manifest digest is the sha256 of the manifest bytes, as a registry computes it.
"""

from __future__ import annotations

import base64
import fnmatch
import gzip
import hashlib
import io
import json
import shlex
import tarfile
import threading
import time
from dataclasses import dataclass, field

from sandbox.aws import AwsSandbox
from sandbox.ecr_auth import PULL, PUSH, Principal, Refused, first_refusal, store_blob
from sandbox.kube import KubeEmulator, PodHandle
from sandbox.kube.containerfs import ContainerFS, Node

MiB = 1 << 20
OCI = {"manifest": "application/vnd.oci.image.manifest.v1+json",
       "config": "application/vnd.oci.image.config.v1+json",
       "layer": "application/vnd.oci.image.layer.v1.tar+gzip"}
DOCKER_V2 = {"manifest": "application/vnd.docker.distribution.manifest.v2+json",
             "config": "application/vnd.docker.container.image.v1+json",
             "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip"}
FILESYSTEM_INSTRUCTIONS = ("RUN", "COPY", "ADD")


class ContractError(Exception):
    """What the real build pod would have failed with."""


class Killed(Exception):
    """The container was killed (SIGKILL, exit code 137) while a step ran: the kernel's OOM killer or a kubelet."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ the pod's mounted Secrets

def secret_volume(pod: dict, container: dict, path: str) -> tuple[dict, dict] | None:
    """The mount serving `path` in the container and the Secret volume behind it."""
    for mount in container.get("volumeMounts", []):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next((v for v in pod["spec"].get("volumes", []) if v["name"] == mount["name"]), None)
            if volume and "secret" in volume:
                return mount, volume
    return None


def read_secret_key(emulator: KubeEmulator, namespace: str, volume: dict, key: str) -> bytes:
    name = volume["secret"]["secretName"]
    secret = emulator.get("secrets", namespace, name)
    if secret is None:
        raise ContractError(f'MountVolume.SetUp failed for volume "{volume["name"]}": secret "{name}" not found')
    if key not in (secret.get("data") or {}):
        raise ContractError(f'secret "{name}" has no key {key!r}')
    return base64.b64decode(secret["data"][key])


def mounted_secret_file(emulator: KubeEmulator, pod: dict, container: dict, path: str) -> bytes | None:
    """The bytes the container reads at `path` when a Secret volume puts a file there, else None."""
    found = secret_volume(pod, container, path)
    if not found:
        return None
    mount, volume = found
    filename = mount.get("subPath") or path.removeprefix(mount["mountPath"].rstrip("/") + "/")
    namespace = pod["metadata"].get("namespace", "default")
    items = volume["secret"].get("items")
    if items:  # only the listed keys, under their paths
        key = next((i["key"] for i in items if i["path"] == filename), None)
    else:  # every key, under its own name
        secret = emulator.get("secrets", namespace, volume["secret"]["secretName"]) or {}
        key = filename if not secret or filename in (secret.get("data") or {}) else None
    return None if key is None else read_secret_key(emulator, namespace, volume, key)


def docker_config_auths(config_json: bytes) -> dict[str, str]:
    """registry host -> `auth` of a docker config.json."""
    return {host: entry.get("auth") for host, entry in json.loads(config_json).get("auths", {}).items()}


def push_refusal(aws: AwsSandbox, region: str, holder: Principal, name: str, manifest: str) -> Refused | None:
    """The first request of pushing `manifest` as `name` that ECR refuses the token's holder (sandbox/ecr_auth.py)."""
    registry, repository, tag = split_name(name)
    parsed = json.loads(manifest)
    first = (parsed.get("layers") or [parsed.get("config", {})])[0].get("digest", "")
    return first_refusal(holder, PUSH, registry, repository, region, digest=first, tag=tag, upload="<uuid>")


def pull_refusal(region: str, holder: Principal, name: str) -> Refused | None:
    registry, repository, tag = split_name(name)
    return first_refusal(holder, PULL, registry, repository, region, tag=tag)


# ------------------------------------------------------------------ the build context and the Dockerfile

def unpack(archive: bytes) -> dict[str, bytes | None]:
    """The archive's paths (no leading `./`): file contents, None for directories, parents included."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive)), mode="r:") as tar:
        tree: dict[str, bytes | None] = {}
        for member in tar.getmembers():
            name = member.name.removeprefix("./").rstrip("/")
            parts = name.split("/")
            for depth in range(1, len(parts)):
                tree.setdefault("/".join(parts[:depth]), None)
            tree[name] = tar.extractfile(member).read() if member.isfile() else None
        return tree


def dockerfile_instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, one string each: continuation lines joined, comments and blanks left out."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        instructions.append(pending + stripped)
        pending = ""
    if pending.strip():
        instructions.append(pending.strip())
    return instructions


def keyword(instruction: str) -> str:
    return instruction.split(None, 1)[0].upper()


def _sources(instruction: str) -> list[str]:
    """The source paths of a COPY/ADD: every argument but flags and the destination."""
    rest = instruction.split(None, 1)[1] if " " in instruction else ""
    args = json.loads(rest) if rest.lstrip().startswith("[") else shlex.split(rest)
    return [a for a in args if not a.startswith("--")][:-1]


def copied_files(instruction: str, context: dict[str, bytes | None]) -> dict[str, bytes]:
    """The context files a COPY/ADD takes: `.` is everything, a directory its contents, else a name or pattern."""
    wanted: dict[str, bytes] = {}
    for source in _sources(instruction):
        source = source.strip("/").removeprefix("./") if source not in (".", "./", "/") else ""
        for path, data in context.items():
            if data is not None and (not source or path == source or path.startswith(source + "/")
                                     or fnmatch.fnmatchcase(path, source)):
                wanted[path] = data
    return dict(sorted(wanted.items()))


@dataclass(frozen=True)
class Step:
    """One instruction of the final stage. `key` hashes everything its result depends on (the base image, the
    build args, every earlier instruction and the files they copied); `layer` is None for metadata-only ones."""

    instruction: str
    key: str
    layer: dict | None


def _sized(seed: str, low: int, spread: int) -> int:
    return low + int(hashlib.sha256(seed.encode()).hexdigest()[:12], 16) % spread


def final_stage_steps(builder: str, instructions: list[str], context: dict[str, bytes | None],
                      build_args: dict[str, str], media: dict[str, str]) -> list[Step]:
    """The steps of the Dockerfile's last stage, from its FROM on."""
    last_from = max((i for i, line in enumerate(instructions) if keyword(line) == "FROM"), default=0)
    steps: list[Step] = []
    chain = ""
    for instruction in instructions[last_from:]:
        word = keyword(instruction)
        copied = copied_files(instruction, context) if word in ("COPY", "ADD") else {}
        content = b"".join(path.encode() + b"\0" + data for path, data in copied.items())
        if word == "FROM":
            base = next(arg for arg in instruction.split()[1:] if not arg.startswith("--"))
            chain = hashlib.sha256(f"{base}|{sorted(build_args.items())}".encode()).hexdigest()
            layer = {"digest": "sha256:" + hashlib.sha256(f"base layer of {base}".encode()).hexdigest(),
                     "size": _sized(base, 25 * MiB, 30 * MiB)}
        else:
            chain = hashlib.sha256(chain.encode() + instruction.encode() + hashlib.sha256(content).digest()).hexdigest()
            layer = None
            if word in FILESYSTEM_INSTRUCTIONS:
                size = len(gzip.compress(content, mtime=0)) if word != "RUN" else _sized(chain, MiB, 63 * MiB)
                layer = {"digest": "sha256:" + hashlib.sha256(f"{builder}|{chain}".encode()).hexdigest(), "size": size}
        steps.append(Step(instruction, chain, {"mediaType": media["layer"], **layer} if layer else None))
    return steps


def image_manifest(steps: list[Step], labels: dict[str, str], platform: str, media: dict[str, str]) -> tuple[str, str]:
    """The image manifest of these steps (a config blob and their layers) and its digest."""
    os_name, _, architecture = (platform or "linux/amd64").partition("/")
    layers = [s.layer for s in steps if s.layer]
    config = json.dumps({
        "architecture": architecture, "os": os_name, "config": {"Labels": dict(sorted(labels.items()))},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        "history": [{"created_by": s.instruction, **({} if s.layer else {"empty_layer": True})} for s in steps],
    }, sort_keys=True, separators=(",", ":")).encode()
    _config_blobs["sha256:" + hashlib.sha256(config).hexdigest()] = config
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": media["manifest"],
        "config": {"mediaType": media["config"], "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
        "layers": layers,
    }, separators=(",", ":"))
    return manifest, "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


# ------------------------------------------------------------------ what each pushed image was built from

@dataclass(frozen=True)
class BuiltImage:
    """What a simulated build made an image from: the app runtime (sandbox/apps) runs its pods from it."""

    context: dict[str, bytes | None]
    instructions: list[str]
    build_args: dict[str, str]


_built_images: dict[str, BuiltImage] = {}  # manifest digest -> its build; digests are content addressed


def remember_build(digest: str, context: dict[str, bytes | None], instructions: list[str],
                   build_args: dict[str, str]) -> None:
    _built_images[digest] = BuiltImage(dict(context), list(instructions), dict(build_args))


def built_image(digest: str) -> BuiltImage | None:
    return _built_images.get(digest)


# ------------------------------------------------------------------ the registry

_config_blobs: dict[str, bytes] = {}  # config digest -> the blob `image_manifest` made, pushed with its manifest


def _store_config(aws: AwsSandbox, registry: str, manifest: str) -> None:
    digest = json.loads(manifest).get("config", {}).get("digest")
    if digest in _config_blobs:
        store_blob(aws, registry.split(".", 1)[0], digest, _config_blobs[digest])

def split_name(name: str) -> tuple[str, str, str]:
    """`<registry>/<repository>:<tag>` -> (registry, repository, tag)."""
    registry, _, rest = name.partition("/")
    repository, _, tag = rest.rpartition(":")
    return registry, repository, tag


def push_manifest(aws: AwsSandbox, region: str, name: str, manifest: str, digest: str) -> bool:
    """Tag `name` with the manifest in the sandbox ECR; False when its repository does not exist."""
    ecr = aws.client("ecr", region)
    _, repository, tag = split_name(name)
    try:  # moto's put_image answers a missing repository with a 500, ECR with RepositoryNotFoundException
        ecr.describe_repositories(repositoryNames=[repository])
    except ecr.exceptions.RepositoryNotFoundException:
        return False
    _store_config(aws, split_name(name)[0], manifest)
    try:
        ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag, imageDigest=digest)
    except ecr.exceptions.ImageAlreadyExistsException:
        pass
    return True


def push_cache_manifest(aws: AwsSandbox, region: str, name: str, manifest: str, digest: str) -> str | None:
    """PUT a registry cache manifest under its tag; None when ECR takes it, else the error BuildKit reports.

    Source: ECR's refusal as quoted in moby/buildkit#3776; its `unknown: ` prefix from moby/buildkit util/errutil and
    containerd remotes/docker/errdesc.go (BuildKit v0.31.2).

    ECR answers a registry error body (code TAG_INVALID for an immutable tag, as `docker push` prints it: "tag
    invalid: The image tag '<tag>' already exists in the '<repo>' repository and cannot be overwritten because the
    repository is immutable."; NAME_UNKNOWN for a missing repository). BuildKit v0.31.2 formats it with
    util/errutil WithDetails as `<code>: <message>`, and containerd's remotes/docker/errdesc.go knows neither
    code, so both read `unknown: ...`. ECR refuses any existing tag of an immutable repository, even one that
    names the same digest; moto's ImageAlreadyExistsException stands for that refusal here.
    """
    ecr = aws.client("ecr", region)
    registry, repository, tag = split_name(name)
    try:
        [found] = ecr.describe_repositories(repositoryNames=[repository])["repositories"]
    except ecr.exceptions.RepositoryNotFoundException:
        return (f"unknown: The repository with name '{repository}' does not exist in the registry with id "
                f"'{registry.split('.', 1)[0]}'")
    if found.get("imageTagMutability") == "IMMUTABLE":
        try:
            ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])
            return (f"unknown: The image tag '{tag}' already exists in the '{repository}' repository and cannot be "
                    "overwritten because the repository is immutable.")
        except ecr.exceptions.ImageNotFoundException:
            pass
    try:
        ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag, imageDigest=digest)
    except ecr.exceptions.ImageAlreadyExistsException:
        pass  # the same manifest under the same tag: nothing changes
    return None


HOLD_LIMIT_SECONDS = 120


class Pace:
    """A build's simulated seconds spread over its steps, so that the pod's whole run takes that long.

    A measured build time covers everything the pod does, so the stand-in's own
    work (download, checks, push) comes out of the same budget; a step taken from
    the cache costs nothing. Created when the pod starts; `spread_over` once the
    steps are known; `finish` waits out what is left, just before the push.
    """

    def __init__(self, total: float, hold: threading.Event | None = None) -> None:
        self._deadline = time.monotonic() + total
        self._total, self._share, self._left = total, 0.0, 1
        self._hold = hold

    def spread_over(self, steps: int) -> None:
        self._share, self._left = self._total / (steps + 1), steps + 1

    def step(self, *, cached: bool = False) -> float:
        """The seconds this step takes: its share of what is left of the budget."""
        if cached:
            self._deadline -= self._share
            seconds = 0.0
        else:
            seconds = max(0.0, self._deadline - time.monotonic()) / self._left
        self._left = max(self._left - 1, 1)
        return seconds

    def finish(self) -> None:
        time.sleep(max(0.0, self._deadline - time.monotonic()))
        if self._hold is not None and not self._hold.wait(timeout=HOLD_LIMIT_SECONDS):
            raise RuntimeError(f"held for more than {HOLD_LIMIT_SECONDS}s: the test never released this build")


@dataclass
class SimulatedBuilder:
    """What both stand-ins share: tests steer builds by image repository, and a pod runs from start to exit.

    `build_seconds` is how long the pod runs (see `Pace`), `failures` fails the
    first RUN step with that text, and `kills` kills the container when the first
    RUN step has started: exit code 137 with that termination reason (`OOMKilled`,
    or `Error` for a SIGKILL from elsewhere), nothing written. `run_output` is
    what the first RUN step prints (e.g. one 1 MiB line). `builds` records
    each build that succeeded, with its start and end. `hijacks` makes a build of
    that repository a compromised one: before its own push it pushes its image over
    each named `<registry>/<repository>:<tag>` with the build's registry credentials.
    `holds` keeps a build of that repository running, after its steps and before
    its push, until the test sets the event: a test that acts during a build does
    not race the build's end. It plays nothing a real builder does differently: a
    pod stays Running until buildctl or the executor exits (moby/buildkit v0.31
    cmd/buildctl build.go returns after the solve and the push), as a slow step
    would keep it; a hold never released fails the build after HOLD_LIMIT_SECONDS.

    The container works on a model of its filesystem (sandbox/kube/containerfs.py)
    with the image's directories (`image_filesystem`) and the kubelet's mounts; its
    termination message is whatever it wrote to the termination-message file, so a
    failed build, which writes nothing there, has none.
    """

    emulator: KubeEmulator
    aws: AwsSandbox
    region: str = "us-west-2"
    build_seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    kills: dict[str, str] = field(default_factory=dict)
    run_output: dict[str, str] = field(default_factory=dict)
    builds: list[dict] = field(default_factory=list)
    hijacks: dict[str, list[str]] = field(default_factory=dict)
    holds: dict[str, threading.Event] = field(default_factory=dict)

    @staticmethod
    def recognises(pod: dict) -> bool:
        raise NotImplementedError

    @staticmethod
    def image_filesystem(image: str) -> tuple[dict[str, Node], int]:
        """The image's directories and the uid it runs as."""
        raise NotImplementedError

    def install(self) -> None:
        self.emulator.on_pod(self.recognises, self.run)

    def pace(self, repository: str) -> Pace:
        return Pace(self.build_seconds.get(repository, 0.0), self.holds.get(repository))

    def run(self, handle: PodHandle) -> None:
        handle.running()
        started = time.monotonic()
        container = (handle.pod["spec"].get("containers") or [{}])[0]
        nodes, uid = self.image_filesystem(container.get("image", ""))
        fs = ContainerFS.for_container(handle.pod, container, nodes, uid)
        try:
            status = self._main(handle, fs, started)
        except Killed as exc:
            handle.terminate(137, reason=exc.reason)
            return
        handle.terminate(status, message=fs.termination_message())

    def _main(self, handle: PodHandle, fs: ContainerFS, started: float) -> int:
        """The container's process, the builder being its entrypoint: its exit status."""
        try:
            record = self._build(handle, fs)
        except Killed:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure, expected or not, fails the build, as in a real pod
            handle.log(self._failure(exc))
            return 1
        self._record(record, started)
        return 0

    def _record(self, record: dict, started: float) -> None:
        record["started"], record["ended"] = started, time.monotonic()
        record["seconds"] = record["ended"] - started
        self.builds.append(record)

    def _build(self, handle: PodHandle, fs: ContainerFS) -> dict:
        """Check the contract and build, writing what the builder writes into `fs`; the record of the build."""
        raise NotImplementedError

    def _failure(self, exc: Exception) -> str:
        """The last log line of a build that failed with `exc`."""
        raise NotImplementedError
