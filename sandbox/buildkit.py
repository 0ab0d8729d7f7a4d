"""A stand-in for the BuildKit pod that checks the contract the real pod depends on.

It plays the part of `buildctl-daemonless.sh build ...` inside the emulated
cluster: it reads the Pod spec the way the kubelet would hand it to the
container, downloads the presigned context URL, checks the archive layout the
dockerfile frontend expects, checks the mounted registry config against a token
minted from the same account, reads the mounted build secrets, "pushes" the
image (an OCI manifest with one layer per FROM/RUN/COPY/ADD, see
sandbox/builders.py) to the sandbox ECR, exports the registry cache, and writes
buildctl's metadata file the way buildctl does (a temp file renamed onto it) into
the container's filesystem model; only what the container's command copies into
the termination-message file becomes the termination message. The container's
`command` runs through the small `/bin/sh` model (sandbox/shell.py). Progress goes
to the log as `--progress=rawjson` lines. A broken contract, or a failure a test
asks for, fails the pod with the text real BuildKit prints.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import posixpath
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sandbox.builders import (
    OCI,
    ContractError,
    Killed,
    SimulatedBuilder,
    docker_config_auths,
    dockerfile_instructions,
    final_stage_steps,
    image_manifest,
    mounted_secret_file,
    pull_refusal,
    push_cache_manifest,
    push_manifest,
    remember_build,
    push_refusal,
    unpack,
)
from sandbox.ecr_auth import Principal, buildkit_text, token_holder
from sandbox.kube import PodHandle
from sandbox.kube.containerfs import ContainerFS, Node, go_strerror
from sandbox.shell import Process, run_argv

# moby/buildkit v0.31.2 Dockerfile: both images are Alpine (/tmp 1777); the privileged one runs as root, the
# rootless one as USER 1000:1000 with HOME=/home/user and these directories chowned to it. /dev is the runtime's
# tmpfs, root 0755 (containerd pkg/oci/spec.go populateDefaultUnixSpec: "mode=755").
IMAGE_ENTRYPOINT = ["buildkitd"]  # rootless: ["rootlesskit", "buildkitd"]; neither is a build
_COMMON = {"/tmp": Node(0, 0o1777), "/dev": Node(0, 0o755), "/usr/bin": Node(), "/etc": Node(), "/run": Node()}
PRIVILEGED_IMAGE = {**_COMMON, "/var/lib/buildkit": Node(), "/root": Node(0, 0o700)}
ROOTLESS_IMAGE = {**_COMMON, "/home/user": Node(1000, 0o755), "/home/user/.local": Node(1000, 0o755),
                  "/home/user/.local/tmp": Node(1000, 0o755), "/home/user/.local/share": Node(1000, 0o755),
                  "/home/user/.local/share/buildkit": Node(1000, 0o755), "/run/user/1000": Node(1000, 0o700)}
ECR_CACHE_ATTRIBUTES = ("type=registry", "mode=max", "image-manifest=true", "oci-mediatypes=true")


def is_buildkit_pod(pod: dict) -> bool:
    containers = pod.get("spec", {}).get("containers", [])
    return any("buildkit" in c.get("image", "") for c in containers)


@dataclass
class BuildctlArgs:
    opts: dict[str, str] = field(default_factory=dict)
    output: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    export_cache: str = ""
    import_cache: str = ""
    metadata_file: str = ""
    progress: str = ""


def parse_buildctl(args: list[str]) -> BuildctlArgs:
    """The parts of a `buildctl build` argv that the contract is about."""
    parsed = BuildctlArgs()
    it = iter(args)
    for arg in it:
        if arg == "--opt":
            key, _, value = next(it).partition("=")
            parsed.opts[key] = value
        elif arg == "--output":
            parsed.output = dict(part.partition("=")[::2] for part in next(csv.reader([next(it)])))
        elif arg == "--secret":
            attributes = dict(part.partition("=")[::2] for part in next(it).split(","))
            parsed.secrets[attributes["id"]] = attributes["src"]
        elif arg == "--export-cache":
            parsed.export_cache = next(it)
        elif arg == "--import-cache":
            parsed.import_cache = next(it)
        elif arg == "--metadata-file":
            parsed.metadata_file = next(it)
        elif arg.startswith("--progress="):
            parsed.progress = arg.partition("=")[2]
    return parsed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


LOG_PIECE = 32 * 1024
STATUS_LOG_BYTES = 1024 * 1024


def _log_statuses(output: bytes) -> list[list[bytes]]:
    """A step's output as buildkitd sends it: written in pieces, grouped into status messages the way moby/buildkit
    v0.31.2 client/status.go `SolveStatus.Marshal` splits them: logs accumulate until their size passes 1 MiB
    (the piece that passes it included); its counter is never reset, so after that each status carries one log."""
    pieces = [output[i:i + LOG_PIECE] for i in range(0, len(output), LOG_PIECE)]
    statuses, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece)
        if size > STATUS_LOG_BYTES:
            statuses.append(current)
            current = []
    return statuses + ([current] if current else [])


class RawJsonProgress:
    """Writes BuildKit `SolveStatus` lines, one per update, as `buildctl --progress=rawjson` does."""

    def __init__(self, handle: PodHandle) -> None:
        self._handle = handle
        self._count = 0

    def _emit(self, status: dict) -> None:
        self._handle.log(json.dumps(status))

    def _vertex(self, name: str) -> dict:
        self._count += 1
        digest = "sha256:" + hashlib.sha256(f"{self._count}{name}".encode()).hexdigest()
        return {"digest": digest, "name": name, "started": _now()}

    def step(self, name: str, *, cached: bool = False, output: str = "", seconds: float = 0.0,
             error: str | None = None) -> None:
        vertex = self._vertex(name)
        digest, started = vertex["digest"], vertex["started"]
        if cached:
            self._emit({"vertexes": [{**vertex, "completed": started, "cached": True}]})
            return
        self._emit({"vertexes": [vertex]})
        for logs in _log_statuses(output.encode()):
            self._emit({"logs": [{"vertex": digest, "stream": 1, "data": base64.b64encode(piece).decode(),
                                  "timestamp": _now()} for piece in logs]})
        time.sleep(seconds)
        self._emit({"vertexes": [{**vertex, "completed": _now(), **({"error": error} if error else {})}]})

    def started(self, name: str) -> None:
        """A step that starts and never ends: the process died under it."""
        self._emit({"vertexes": [self._vertex(name)]})


@dataclass
class SimulatedBuildKit(SimulatedBuilder):
    """The BuildKit pod's behaviour, steered as `SimulatedBuilder` says; `exported_caches` are the registry
    caches its builds have written, which later builds import."""

    exported_caches: set[str] = field(default_factory=set)

    recognises = staticmethod(is_buildkit_pod)

    @staticmethod
    def image_filesystem(image: str) -> tuple[dict[str, Node], int]:
        return (ROOTLESS_IMAGE, 1000) if image.endswith("-rootless") else (PRIVILEGED_IMAGE, 0)

    def _failure(self, exc: Exception) -> str:
        if isinstance(exc, ContractError):
            return f"error: failed to solve: {exc}"
        return f"error: sandbox buildkit: {type(exc).__name__}: {exc}"

    def _main(self, handle: PodHandle, fs: ContainerFS, started: float) -> int:
        """The container's argv (`command` + `args`) run as the image would: `/bin/sh -c` through the shell model,
        `buildctl-daemonless.sh` as the simulated build."""
        try:
            container = _single_container(handle.pod["spec"])
        except ContractError as exc:
            handle.log(self._failure(exc))
            return 1
        command, args, env = handle.process(container)  # `$(VAR)` expanded by the kubelet, before the shell
        argv = [*(command or IMAGE_ENTRYPOINT), *args]
        programs = {"buildctl-daemonless.sh": lambda process: self._buildctl(handle, process, started)}
        return run_argv(argv, fs, env, programs, handle.log)

    def _buildctl(self, handle: PodHandle, process: Process, started: float) -> int:
        """`buildctl-daemonless.sh build ...`: the script's exit status is buildctl's (moby/buildkit v0.31.2
        examples/buildctl-daemonless/buildctl-daemonless.sh ends with `$BUILDCTL ... "$@"` under `set -eu`)."""
        if process.args[:1] != ["build"]:
            handle.log(f"sandbox buildkit: only `buildctl build` is modelled, not {process.args[:1]}")
            return 1
        try:
            record = self._build(handle, process)
        except Killed:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails the build, as in a real pod
            handle.log(self._failure(exc))
            return 1
        if record["metadata_file"]:
            try:
                atomic_write_file(process.fs, record["metadata_file"], record["metadata_json"].encode())
            except OSError as exc:  # cmd/buildctl/main.go handleErr: `error: %v`, exit 1
                handle.log(f"error: {go_error(exc)}")
                return 1
        # the pushed image carries its context's files and the Dockerfile's config, as the image exporter writes
        # them (moby/buildkit v0.31 exporter/containerimage writer.go), so the app runtime can start it
        self._record(record, started)
        return 0

    def _build(self, handle: PodHandle, process: Process) -> dict:
        container = _single_container(handle.pod["spec"])
        _check_security(container)
        args = parse_buildctl(process.args[1:])
        if args.progress != "rawjson":
            raise ContractError("--progress=rawjson is what the flow parses into step timings")
        _check_cache_flags(args)
        auth = self._mounted_registry_auth(handle, container, process.env)
        secrets = {id_: self._mounted_secret(handle, container, id_, src) for id_, src in args.secrets.items()}
        names = args.output.get("name", "").split(",")
        repository = names[0].rsplit(":", 1)[0]
        registry = names[0].split("/", 1)[0]
        pace = self.pace(repository)
        progress = RawJsonProgress(handle)

        try:
            archive = _download(args.opts.get("context", ""))
        except ContextDownloadFailed as exc:
            progress.step("[internal] load remote build context", error=exc.cause)
            raise
        progress.step("[internal] load remote build context")
        contextsubdir = args.opts.get("contextsubdir", "")
        tree, dockerfile = _check_layout(archive, args.opts.get("filename", "Dockerfile"), contextsubdir)
        instructions = dockerfile_instructions(dockerfile)
        holder = token_holder(self.aws, auth.get(registry))
        cache_ready = bool(args.import_cache) and args.import_cache.partition("ref=")[2] in self.exported_caches
        if args.import_cache:
            cache_ref = args.import_cache.partition("ref=")[2]
            refused = pull_refusal(self.region, holder, cache_ref) if holder else None
            if holder is None or refused:  # BuildKit goes on without the cache (a warning, not a failure)
                cache_ready = False
                answer = buildkit_text(refused) if refused else "401 Unauthorized"
                progress.step("importing cache manifest from " + cache_ref,
                              output=f"failed to configure registry cache importer: {answer}\n")
            elif not cache_ready:
                progress.step("importing cache manifest from " + cache_ref,
                              output="failed to configure registry cache importer: not found\n")
        pace.spread_over(len(instructions))
        failure = self.failures.get(repository)
        kill = self.kills.get(repository)
        for number, instruction in enumerate(instructions, 1):
            name = f"[{number}/{len(instructions)}] {instruction}"
            if kill and instruction.startswith("RUN"):
                progress.started(name)
                time.sleep(pace.step())
                raise Killed(kill)
            if failure and instruction.startswith("RUN"):
                progress.step(name, output=failure + "\n", error=failure, seconds=pace.step())
                raise ContractError(failure)
            if instruction.startswith("RUN") and repository in self.run_output:
                progress.step(name, output=self.run_output[repository], seconds=pace.step())
                continue
            cached = cache_ready and not instruction.startswith("COPY")
            progress.step(name, cached=cached, seconds=pace.step(cached=cached))
        if failure:
            raise ContractError(failure)
        if holder is None:
            progress.step("exporting to image", error="401 Unauthorized")
            raise ContractError(f"failed to push {names[0]}: unexpected status from HEAD request: 401 Unauthorized")
        context = {path.removeprefix(f"{contextsubdir}/"): data for path, data in tree.items()
                   if not contextsubdir or path.startswith(f"{contextsubdir}/")}
        build_args = {k.removeprefix("build-arg:"): v for k, v in args.opts.items() if k.startswith("build-arg:")}
        labels = {k.removeprefix("label:"): v for k, v in args.opts.items() if k.startswith("label:")}
        steps = final_stage_steps("buildkit", instructions, context, build_args, OCI)
        manifest, digest = image_manifest(steps, labels, args.opts.get("platform", ""), OCI)
        remember_build(digest, context, instructions, build_args)
        for target in self.hijacks.get(repository, []):
            self._hijack(progress, holder, target, manifest, digest)
        pace.finish()
        self._push(names, manifest, digest, holder, progress)
        progress.step("exporting to image", output=f"pushing manifest for {names[0]}@{digest} done\n")
        if args.export_cache:
            self._export_cache(progress, args.export_cache, steps, holder)
        metadata = {"containerimage.digest": digest, "image.name": ",".join(names)}
        return {
            "metadata_file": args.metadata_file,
            # writeMetadataFile: json.MarshalIndent(out, "", "  "); Go sorts map keys
            "metadata_json": json.dumps(metadata, indent=2, sort_keys=True),
            "pod": handle.name,
            "context_url": args.opts["context"],
            "names": names,
            "opts": args.opts,
            "secrets": {id_: hashlib.sha256(value).hexdigest() for id_, value in secrets.items()},
            "cache_imported": cache_ready,
            "metadata": metadata,
        }

    def _hijack(self, progress: RawJsonProgress, holder: Principal, target: str, manifest: str, digest: str) -> None:
        """A compromised build step pushing over `target` with the build's own registry credentials."""
        refused = push_refusal(self.aws, self.region, holder, target, manifest)
        if not refused:
            push_manifest(self.aws, self.region, target, manifest, digest)
        progress.step(f"RUN push {target} (a compromised step)",
                      output=(buildkit_text(refused) if refused else f"pushed {target}") + "\n")

    def _export_cache(self, progress: RawJsonProgress, export: str, steps: list, holder: Principal) -> None:
        """The registry cache exporter (moby/buildkit v0.31.2 solver/llbsolver/export.go runCacheExporters, vertex
        "exporting cache to registry"; cache/remotecache/export.go Finalize writes layers, config, then the cache
        image manifest under the ref's tag). A refused manifest fails the build unless `ignore-error` is true
        (control/control.go parses it with strconv.ParseBool; an invalid value is skipped, so false)."""
        attributes = dict(part.partition("=")[::2] for part in export.split(","))
        ref = attributes["ref"]
        ignore_error = attributes.get("ignore-error") in ("1", "t", "T", "TRUE", "true", "True")
        manifest, digest = image_manifest(steps, {"cache": ref}, "", OCI)
        denied = push_refusal(self.aws, self.region, holder, ref, manifest)
        if denied:  # the first blob is a layer: cache/remotecache/export.go wraps it "error writing layer blob"
            refused, error = buildkit_text(denied), f"error writing layer blob: {buildkit_text(denied)}"
        else:
            refused = push_cache_manifest(self.aws, self.region, ref, manifest, digest)
            error = f"error writing manifest blob: {refused}" if refused else None
        progress.step("exporting cache to registry",
                      output=f"writing cache image manifest {digest}{' done' if not refused else ''}\n", error=error)
        if refused and not ignore_error:
            raise ContractError(error)
        if not refused:
            self.exported_caches.add(ref)

    def _mounted_registry_auth(self, handle: PodHandle, container: dict, env: dict[str, str]) -> dict[str, str]:
        config_dir = env.get("DOCKER_CONFIG")
        if not config_dir:
            raise ContractError("DOCKER_CONFIG is not set: buildctl will find no registry credentials")
        config = mounted_secret_file(self.emulator, handle.pod, container, f"{config_dir.rstrip('/')}/config.json")
        if config is None:
            raise ContractError(f"no Secret mounts config.json at $DOCKER_CONFIG ({config_dir}): "
                                "the Secret's .dockerconfigjson must be mounted as config.json")
        return docker_config_auths(config)

    def _mounted_secret(self, handle: PodHandle, container: dict, secret_id: str, src: str) -> bytes:
        value = mounted_secret_file(self.emulator, handle.pod, container, src)
        if value is None:
            raise ContractError(f"failed to load secret {secret_id}: open {src}: no such file or directory")
        return value

    def _push(self, names: list[str], manifest: str, digest: str, holder: Principal,
              progress: RawJsonProgress) -> None:
        for name in names:
            if refused := push_refusal(self.aws, self.region, holder, name, manifest):
                progress.step("exporting to image", error="403 Forbidden")
                raise ContractError(f"failed to push {name}: {buildkit_text(refused)}")
            if not push_manifest(self.aws, self.region, name, manifest, digest):
                repository = name.partition("/")[2].rpartition(":")[0]
                raise ContractError(
                    f"failed to push {name}: name unknown: The repository with name '{repository}' does not exist"
                )


def _single_container(spec: dict) -> dict:
    if spec.get("initContainers"):
        raise ContractError("the build pod must have no init containers")
    if len(spec["containers"]) != 1:
        raise ContractError("the build pod must have exactly one container")
    return spec["containers"][0]


def _check_security(container: dict) -> None:
    security = container.get("securityContext", {})
    if container["image"].endswith("-rootless"):
        if security.get("runAsUser") != 1000:
            raise ContractError("rootless buildkit must run as uid 1000")
    elif not security.get("privileged"):
        raise ContractError(
            "failed to mount /tmp/buildkit-mount: [{Type:bind Source:/proc}]: operation not permitted"
        )


def _check_cache_flags(args: BuildctlArgs) -> None:
    """ECR accepts a registry cache only as an OCI image manifest."""
    if not args.export_cache:
        return
    missing = [a for a in ECR_CACHE_ATTRIBUTES if a not in args.export_cache.split(",")]
    if missing:
        raise ContractError(f"ECR rejects the cache export without {', '.join(missing)}: 400 Bad Request")
    if args.import_cache and args.import_cache.partition("ref=")[2] != args.export_cache.split("ref=")[1].split(",")[0]:
        raise ContractError("the cache is imported from another ref than it is exported to")


class ContextDownloadFailed(ContractError):
    """The http source's error (the vertex's), wrapped by the dockerfile frontend as buildctl prints it."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"failed to resolve httpcontext: {cause}")
        self.cause = cause


def _download(url: str) -> bytes:
    """moby/buildkit v0.31.2 source/http/source.go: a status outside 200-399 is `invalid response status N`; a
    failed request is Go's *url.Error, `Get "<url>": <error>`, the whole URL with its query (golang/go
    src/net/http/client.go `uerr` strips only a password, src/net/url/url.go Error.Error quotes it with %q; the
    error after it is Python's here). frontend/dockerui/context.go wraps it: `failed to resolve httpcontext`."""
    if not url.startswith(("http://", "https://")):
        raise ContractError(f"failed to resolve httpcontext: context {url!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ContextDownloadFailed(f"invalid response status {exc.code}") from None
    except OSError as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise ContextDownloadFailed(f'Get "{url}": {reason}') from None


def _check_layout(archive: bytes, filename: str, contextsubdir: str) -> tuple[dict[str, bytes | None], str]:
    """The unpacked archive and the Dockerfile the frontend would read, after checking what it needs is where it
    looks."""
    if archive[:2] != b"\x1f\x8b":
        raise ContractError("remote context is not a gzip-compressed tar archive")
    tree = unpack(archive)
    if tree.get(filename) is None:
        raise ContractError(f"failed to read dockerfile: open {filename}: no such file or directory")
    if contextsubdir and contextsubdir not in tree:
        raise ContractError(f"contextsubdir {contextsubdir!r} not found in the context")
    return tree, tree[filename].decode()


def atomic_write_file(fs: ContainerFS, filename: str, data: bytes) -> None:
    """containerd/continuity ioutils.go AtomicWriteFile (vendored in moby/buildkit v0.31.2): os.CreateTemp in the
    target's folder (pattern `.tmp-<base>`, a random decimal appended), chmod, write, then rename onto the target."""
    directory, base = posixpath.split(posixpath.normpath(filename))
    temp = posixpath.join(directory, f".tmp-{base}{random.getrandbits(32)}")
    fs.create_exclusive(temp, 0o600)
    fs.chmod(temp, 0o666)
    fs.write(temp, data)
    fs.rename(temp, filename)


def go_error(exc: OSError) -> str:
    """Go's *PathError (`open F: ...`) or, for a rename, *LinkError (`rename OLD NEW: ...`)."""
    if exc.filename2:
        return f"rename {exc.filename} {exc.filename2}: {go_strerror(exc.errno)}"
    return f"open {exc.filename}: {go_strerror(exc.errno)}"
