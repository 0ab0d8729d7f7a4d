"""A stand-in for the Kaniko executor pod that checks the contract the real executor depends on.

It plays `/kaniko/executor <args>` (the image's entrypoint) inside the emulated cluster, following kaniko's
source (GoogleContainerTools/kaniko, v1.2x). The default image is now the maintained fork's
(flows/config.py DEFAULT_KANIKO_IMAGE, osscontainertools/kaniko v1.28.3), checked to keep this contract at that tag:
every flag the Job passes is in cmd/executor/cmd/root.go, pkg/buildcontext/https.go keeps HTTPSTar and its error
text, and deploy/Dockerfile keeps ENTRYPOINT /kaniko/executor, DOCKER_CONFIG=/kaniko/.docker/, WORKDIR /workspace
and docker-credential-ecr-login.

- cmd/executor/cmd/root.go: flags parse like pflag; PersistentPreRunE needs `--destination` ("you must provide
  --destination, or use --no-push"), resolves the context (pkg/buildcontext/buildcontext.go picks the reader by
  prefix, https:// is pkg/buildcontext/https.go's HTTPSTar: GET, status 200 or "HTTPSTar bad status from server:
  <status>", then a gzip tar unpacked into /kaniko/buildcontext/), joins `--context-sub-path` (which must exist),
  and resolves `--dockerfile` like resolveDockerfilePath: the path itself if it exists, else the path joined to
  the context, else "please provide a valid path to a Dockerfile within the build context with --dockerfile".
  Those errors reach the log through cobra as `Error: <error>` (cobra prints the usage text after it; left out).
  Run then checks push permission for each destination (pkg/executor/push.go CheckPushPermissions), builds
  (pkg/executor/build.go) and pushes (push.go DoPush, which writes `--digest-file` first); its errors are printed
  by `fmt.Println(err)` and exit 1.
- Registry credentials come from `$DOCKER_CONFIG/config.json` (DOCKER_CONFIG defaults to /kaniko/.docker/ in the
  executor image), here the file a Secret volume mounts there; its `auth` for the registry must equal a token
  minted from the sandbox ECR, else ECR's answer to the push-permission check (as in kaniko issues #2088, #2882).
- `--cache=true`: before building, each RUN's cache key is looked up as `<cache repo>:<key>` (pkg/cache/cache.go
  "Checking for cached layer ..."; a hit: "Using caching version of cmd: ..."; the first miss, "No cached layer
  found for cmd ...", ends the lookups); after a RUN runs, its layer is pushed there (push.go pushLayerToCache).
  build.go treats a failed cache push as a warning ("Error uploading layer to cache: ..."), not a failure, so a
  missing cache repository costs the cache, not the build.
- The log is `--log-format=text` (pkg/logging/logging.go: logrus TextFormatter with colors disabled, so
  `time="..." level=info msg="..."`), `color` (the default) or `json`.

The context URL must be https://, as HTTPSTar is the only http reader kaniko has; the sandbox's moto speaks
plain http, so http://127.0.0.1 and http://localhost are read the same way. The pod must also keep the shape
this project gives it: one container, no init containers, no `command` that replaces the executor, and not
privileged (where Kaniko is chosen, Pod Security refuses privileged pods; the failure text is its refusal).

Tests steer builds by image repository like SimulatedBuildKit: `build_seconds` is how long the pod runs, spread
over the instructions (`sandbox.builders.Pace`), `failures` makes the first RUN that runs print that text and fail as kaniko does, and `kills` kills
the container when that RUN has started (exit code 137 with that reason, no digest written).
"""

from __future__ import annotations

import http
import json
import posixpath
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

from sandbox.builders import (
    DOCKER_V2,
    ContractError,
    Killed,
    Pace,
    SimulatedBuilder,
    Step,
    docker_config_auths,
    dockerfile_instructions,
    final_stage_steps,
    image_manifest,
    keyword,
    mounted_secret_file,
    push_manifest,
    remember_build,
    split_name,
    unpack,
)
from sandbox.ecr_auth import PUSH, first_refusal, kaniko_text, token_holder
from sandbox.kube import PodHandle
from sandbox.kube.containerfs import ContainerFS, Node, go_strerror

BUILD_CONTEXT_DIR = "/kaniko/buildcontext"  # constants.BuildContextDir
IMAGE_DOCKER_CONFIG = "/kaniko/.docker/"  # ENV DOCKER_CONFIG of the executor image
WORKING_DIR = "/workspace"  # WORKDIR of the executor image
# cmd/executor/cmd/root.go addKanikoOptionsFlags and init (v1.23)
STRING_FLAGS = {"dockerfile": "Dockerfile", "context": "/workspace/", "context-sub-path": "", "bucket": "",
                "snapshot-mode": "full", "custom-platform": "", "kaniko-dir": "/kaniko", "tar-path": "", "target": "",
                "cache-repo": "", "cache-dir": "/cache", "digest-file": "", "image-name-with-digest-file": "",
                "image-name-tag-with-digest-file": "", "oci-layout-path": "", "cache-ttl": "336h0m0s", "git": "",
                "compression": "", "verbosity": "info", "log-format": "color", "push-retry": "0",
                "image-fs-extract-retry": "0", "image-download-retry": "0", "compression-level": "-1"}
INT_FLAGS = {"push-retry", "image-fs-extract-retry", "image-download-retry", "compression-level"}
LIST_FLAGS = {"destination", "build-arg", "label", "insecure-registry", "skip-tls-verify-registry", "registry-mirror",
              "registry-map", "registry-certificate", "registry-client-cert", "ignore-path"}
BOOL_FLAGS = {"insecure": False, "skip-tls-verify": False, "insecure-pull": False, "skip-tls-verify-pull": False,
              "single-snapshot": False, "reproducible": False, "no-push": False, "no-push-cache": False,
              "cache": False, "compressed-caching": True, "cleanup": False, "skip-unused-stages": False,
              "use-new-run": False, "cache-copy-layers": False, "cache-run-layers": True, "force": False,
              "log-timestamp": False, "ignore-var-run": True, "force-build-metadata": False,
              "skip-push-permission-check": False, "push-ignore-immutable-tag-errors": False,
              "skip-default-registry-fallback": False, "preserve-context": False}
SHORT_FLAGS = {"f": "dockerfile", "c": "context", "b": "bucket", "d": "destination", "v": "verbosity"}
CONTEXT_PREFIXES = "gs://, dir://, tar://, s3://, git://, https://"
METADATA_ONLY = {"ENV", "ARG", "LABEL", "EXPOSE", "USER", "CMD", "ENTRYPOINT", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
                 "ONBUILD", "MAINTAINER"}
RUN_FAILED = "error building image: error building stage: failed to execute command: waiting for process to exit: " \
             "exit status 1"
LEVEL_COLORS = {"info": 36, "warning": 33, "error": 31}


class Exited(Exception):
    """The executor ended with exit code 1 after printing this line."""


def is_kaniko_pod(pod: dict) -> bool:
    containers = pod.get("spec", {}).get("containers", [])
    return any(c.get("name") == "kaniko" or "kaniko" in c.get("image", "") for c in containers)


def parse_flags(args: list[str]) -> dict:
    """The executor's flags, parsed as pflag does (`--name=value`, `--name value`, bare booleans, shorthands);
    cobra's errors as `Error: ...`."""
    flags: dict = {**STRING_FLAGS, **BOOL_FLAGS, **{name: [] for name in LIST_FLAGS}}
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            shown = f"--{name}"
        else:
            letter, value = arg[1], arg[2:].removeprefix("=")
            has_value = bool(arg[2:])
            if letter not in SHORT_FLAGS:
                raise Exited(f"Error: unknown shorthand flag: '{letter}' in {arg}")
            name, shown = SHORT_FLAGS[letter], f"-{letter}"
        if name in BOOL_FLAGS:
            if not has_value:
                value = "true"
            if value not in ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"):
                raise Exited(f'Error: invalid argument "{value}" for "{shown}" flag: strconv.ParseBool: '
                             f'parsing "{value}": invalid syntax')
            flags[name] = value in ("1", "t", "T", "TRUE", "true", "True")
            continue
        if name not in STRING_FLAGS and name not in LIST_FLAGS:
            raise Exited(f"Error: unknown flag: {shown}")
        if not has_value:
            value = next(rest, None)
            if value is None:
                raise Exited(f"Error: flag needs an argument: {shown}")
        if name in INT_FLAGS and not value.lstrip("-").isdigit():
            raise Exited(f'Error: invalid argument "{value}" for "{shown}" flag: strconv.ParseInt: '
                         f'parsing "{value}": invalid syntax')
        if name in LIST_FLAGS:
            flags[name].append(value)
        else:
            flags[name] = value
    return flags


def go_quote(text: str) -> str:
    """Go's %q for the text logrus quotes."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return '"' + "".join(escapes.get(ch, ch if ch.isprintable() else f"\\x{ord(ch):02x}") for ch in text) + '"'


def _needs_quoting(text: str) -> bool:
    """logrus TextFormatter.needsQuoting."""
    return any(not (ch.isascii() and (ch.isalnum() or ch in "-._/@^+")) for ch in text)


class KanikoLog:
    """The executor's logrus output in the format `--log-format` picked (pkg/logging/logging.go)."""

    def __init__(self, handle: PodHandle, log_format: str) -> None:
        if log_format not in ("text", "color", "json"):
            raise Exited(f'Error: not a valid log format: "{log_format}". Please specify one of (text, color, json)')
        self._handle, self._format, self._start = handle, log_format, time.monotonic()
        self.lines: list[str] = []

    def _write(self, level: str, msg: str) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if self._format == "text":
            line = f'time="{now}" level={level} msg={go_quote(msg) if _needs_quoting(msg) else msg}'
        elif self._format == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now}, ensure_ascii=False, separators=(",", ":"))
        else:
            seconds = int(time.monotonic() - self._start)
            line = f"\x1b[{LEVEL_COLORS[level]}m{level.upper()[:4]}\x1b[0m[{seconds:04d}] {msg:<44} "
        self.raw(line)

    def info(self, msg: str) -> None:
        self._write("info", msg)

    def warning(self, msg: str) -> None:
        self._write("warning", msg)

    def raw(self, line: str) -> None:
        """A line that does not go through logrus: a RUN's own output, the final error."""
        self.lines.append(line)
        self._handle.log(line)


def _executor_container(handle: PodHandle) -> dict:
    spec = handle.pod["spec"]
    if spec.get("initContainers") or len(spec.get("containers", [])) != 1:
        raise Exited("sandbox kaniko: the build pod must have exactly one container and no init containers")
    container = spec["containers"][0]
    if (container.get("securityContext") or {}).get("privileged"):
        raise Exited(f'pods "{handle.name}" is forbidden: violates PodSecurity "baseline:latest": privileged '
                     f'(container "{container["name"]}" must not set securityContext.privileged=true)')
    if container.get("command") not in (None, [], ["/kaniko/executor"]):
        raise Exited(f"sandbox kaniko: command {container['command']} replaces the executor's entrypoint "
                     "/kaniko/executor")
    return container


def _download(url: str, log: KanikoLog) -> bytes:
    """pkg/buildcontext: the reader by prefix, then HTTPSTar.UnpackTarFromBuildContext's download."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" and not (parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost")):
        raise Exited("Error: error resolving source context: unknown build context prefix provided, "
                     f"please use one of the following: {CONTEXT_PREFIXES}")
    log.info("Retrieving https tar file")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            archive = response.read()
    except urllib.error.HTTPError as exc:
        status = f"{exc.code} {http.HTTPStatus(exc.code).phrase}"
        raise Exited(f"Error: error resolving source context: HTTPSTar bad status from server: {status}") from None
    except OSError as exc:
        raise Exited(f'Error: error resolving source context: Get "{url}": {exc}') from None
    log.info("Retrieved https tar file")
    if archive[:2] != b"\x1f\x8b":
        raise Exited("Error: error resolving source context: gzip: invalid header")
    return archive


class _Tree:
    """The executor's view of its filesystem: the unpacked context under /kaniko/buildcontext, nothing else."""

    def __init__(self, files: dict[str, bytes | None]) -> None:
        self.files = files

    def relative(self, path: str) -> str | None:
        path = posixpath.normpath(posixpath.join(WORKING_DIR, path))
        if path == BUILD_CONTEXT_DIR:
            return ""
        return path.removeprefix(BUILD_CONTEXT_DIR + "/") if path.startswith(BUILD_CONTEXT_DIR + "/") else None

    def exists(self, path: str) -> bool:
        rel = self.relative(path)
        return rel == "" or (rel is not None and rel in self.files)

    def read(self, path: str) -> bytes | None:
        rel = self.relative(path)
        return self.files.get(rel) if rel else None

    def under(self, directory: str) -> dict[str, bytes | None]:
        rel = self.relative(directory)
        if rel is None:
            return {}
        return {p.removeprefix(rel + "/") if rel else p: data for p, data in self.files.items()
                if not rel or p.startswith(rel + "/")}


def _run_argv(instruction: str) -> list[str]:
    """The argv a RUN executes (shell form through /bin/sh -c, exec form as written)."""
    line = instruction.split(None, 1)[1]
    if line.lstrip().startswith("["):
        return json.loads(line)
    return ["/bin/sh", "-c", line]


def _go_list(items: list[str]) -> str:
    return "[" + " ".join(items) + "]"


@dataclass
class SimulatedKaniko(SimulatedBuilder):
    """The Kaniko executor pod's behaviour, steered as `SimulatedBuilder` says; see the module docstring."""

    recognises = staticmethod(is_kaniko_pod)

    @staticmethod
    def image_filesystem(image: str) -> tuple[dict[str, Node], int]:
        """The executor image runs as root (no USER) with its work directories; /dev is the runtime's tmpfs."""
        return {"/kaniko": Node(), WORKING_DIR: Node(), "/dev": Node()}, 0

    def _failure(self, exc: Exception) -> str:
        if isinstance(exc, (Exited, ContractError)):
            return str(exc)
        return f"sandbox kaniko: {type(exc).__name__}: {exc}"

    # ---------------------------------------------------------------- root.go PersistentPreRunE and Run

    def _build(self, handle: PodHandle, fs: ContainerFS) -> dict:
        container = _executor_container(handle)
        _, args, _ = handle.process(container)  # `$(VAR)` expanded by the kubelet
        flags = parse_flags(args)
        log = KanikoLog(handle, flags["log-format"])
        destinations = flags["destination"]
        pace = self.pace(destinations[0].rpartition(":")[0] if destinations else "")
        if not flags["no-push"] and not destinations:
            raise Exited("Error: you must provide --destination, or use --no-push")
        tree, context_dir = self._resolve_source_context(flags, log)
        dockerfile = self._resolve_dockerfile(flags["dockerfile"], context_dir, tree)
        docker_config, auths = self._docker_config(handle, container)
        self._check_push_permissions([] if flags["no-push"] else destinations, auths)
        repository = _one_repository(destinations) if destinations else ""
        instructions = dockerfile_instructions(tree.read(dockerfile).decode())
        build_args = dict(arg.partition("=")[::2] for arg in flags["build-arg"])
        steps = final_stage_steps("kaniko", instructions, tree.under(context_dir), build_args, DOCKER_V2)
        cache_repo = (flags["cache-repo"] or f"{repository}/cache") if flags["cache"] else ""
        cached = self._do_build(instructions, steps, flags, cache_repo, repository, log, pace)
        labels = dict(label.partition("=")[::2] for label in flags["label"])
        manifest, digest = image_manifest(steps, labels, flags["custom-platform"], DOCKER_V2)
        remember_build(digest, tree.under(context_dir), instructions, build_args)
        pace.finish()
        if flags["digest-file"]:  # push.go DoPush: a plain os.WriteFile before pushing, once the build succeeded
            try:
                fs.write(flags["digest-file"], digest.encode())
            except OSError as exc:
                raise Exited(f"error pushing image: writing digest to file failed: open {exc.filename}: "
                             f"{go_strerror(exc.errno)}") from None
        if flags["no-push"]:
            log.info("Skipping push to container registry due to --no-push flag")
        for destination in [] if flags["no-push"] else destinations:
            log.info(f"Pushing image to {destination}")
            push_manifest(self.aws, self.region, destination, manifest, digest)
            log.info(f"Pushed {destination.rpartition(':')[0]}@{digest}")
        return {
            "pod": handle.name,
            "context_url": flags["context"],
            "destinations": destinations,
            "digest": digest,
            "docker_config": docker_config,
            "cache_repo": cache_repo,
            "cached": cached,
            "layers": sum(1 for step in steps if step.layer),
            "log": log.lines,
        }

    def _resolve_source_context(self, flags: dict, log: KanikoLog) -> tuple[_Tree, str]:
        """root.go resolveSourceContext: download and unpack a remote context, then add --context-sub-path."""
        source = flags["context"]
        if not source and not flags["bucket"]:
            raise Exited("Error: error resolving source context: please specify a path to the build context "
                         "with the --context flag or a bucket with the --bucket flag")
        if "://" not in source:
            return _Tree({}), source
        archive = _download(source, log)
        tree = _Tree(unpack(archive))
        log.info("Extracted https tar file")
        directory = BUILD_CONTEXT_DIR + "/"
        if flags["context-sub-path"]:
            directory = posixpath.normpath(posixpath.join(directory, flags["context-sub-path"]))
            if not tree.exists(directory):
                raise Exited(f"Error: error resolving source context: stat {directory}: no such file or directory")
        return tree, directory

    @staticmethod
    def _resolve_dockerfile(path: str, context_dir: str, tree: _Tree) -> str:
        """root.go resolveDockerfilePath: the path if it exists, else the path joined to the context."""
        for candidate in (path, posixpath.normpath(context_dir + "/" + path)):
            if tree.exists(candidate) and tree.read(candidate) is not None:
                return candidate
        raise Exited("Error: error resolving dockerfile path: please provide a valid path to a Dockerfile within "
                     "the build context with --dockerfile")

    def _docker_config(self, handle: PodHandle, container: dict) -> tuple[dict | None, dict[str, str]]:
        """push.go DockerConfLocation, read through the Secret volume mounted there; no file, no credentials."""
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        directory = posixpath.normpath(env.get("DOCKER_CONFIG") or IMAGE_DOCKER_CONFIG)
        mounted = any(posixpath.normpath(m["mountPath"]) == directory
                      or posixpath.normpath(m["mountPath"]).startswith(directory + "/")
                      for m in container.get("volumeMounts", []))
        if not mounted:  # a DOCKER_CONFIG that does not exist means the image's own
            directory = posixpath.normpath(IMAGE_DOCKER_CONFIG)
        path = f"{directory}/config.json"
        config = mounted_secret_file(self.emulator, handle.pod, container, path)
        if config is None:
            return None, {}
        volume = next(v for v in handle.pod["spec"]["volumes"]
                      if v["name"] == _mount_for(container, path)["name"])
        return {"path": path, "secret": volume["secret"]["secretName"]}, docker_config_auths(config)

    def _check_push_permissions(self, destinations: list[str], auths: dict[str, str]) -> None:
        """push.go CheckPushPermissions, answered as ECR answers `POST /v2/<repo>/blobs/uploads/`."""
        ecr = self.aws.client("ecr", self.region)
        for destination in destinations:
            registry, repository, _ = split_name(destination)
            check = (f'checking push permission for "{destination}": '
                     f"POST https://{registry}/v2/{repository}/blobs/uploads/")
            holder = token_holder(self.aws, auths.get(registry))
            refused = holder and first_refusal(holder, [PUSH[1]], registry, repository, self.region)
            if holder is None:
                answer = "unexpected status code 401 Unauthorized: Not Authorized"
            elif refused:  # the POST is ecr:InitiateLayerUpload (sandbox/ecr_auth.py)
                answer = kaniko_text(refused).removeprefix(f"{refused.method} {refused.url}: ")
            else:
                try:
                    ecr.describe_repositories(repositoryNames=[repository])
                    continue
                except ecr.exceptions.RepositoryNotFoundException:
                    answer = (f"NAME_UNKNOWN: The repository with name '{repository}' does not exist in the registry "
                              f"with id '{registry.split('.', 1)[0]}'")
            raise Exited("error checking push permissions -- make sure you entered the correct tag name, and that you "
                         f"are authenticated correctly, and try again: {check}: {answer}")

    # ---------------------------------------------------------------- build.go DoBuild

    def _do_build(self, instructions: list[str], steps: list[Step], flags: dict, cache_repo: str, repository: str,
                  log: KanikoLog, pace: Pace) -> list[str]:
        """The log of one stage's build, the RUN steps taken from the cache; pushes new RUN layers to it."""
        base = next(arg for arg in steps[0].instruction.split()[1:] if not arg.startswith("--"))
        for line in (f"Retrieving image manifest {base}", f"Retrieving image {base} from registry {_registry(base)}",
                     f"Retrieving image manifest {base}", "Returning cached image manifest",
                     "Built cross stage deps: map[]",
                     f"Retrieving image manifest {base}", "Returning cached image manifest",
                     f"Retrieving image manifest {base}", "Returning cached image manifest",
                     "Executing 0 build triggers",
                     f"Building stage '{base}' [idx: '{sum(keyword(i) == 'FROM' for i in instructions) - 1}', "
                     "base-idx: '-1']"):
            log.info(line)
        commands = steps[1:]
        cached = self._optimize(commands, flags, cache_repo, log) if cache_repo else set()
        unpacking = next((s.instruction for s in commands if keyword(s.instruction) in ("COPY", "ADD")
                          or (keyword(s.instruction) == "RUN" and s.instruction not in cached)), None)
        log.info(f"Unpacking rootfs as cmd {unpacking} requires it." if unpacking
                 else "Skipping unpacking as no commands require it.")
        pace.spread_over(len(commands))
        failure, kill = self.failures.get(repository), self.kills.get(repository)
        snapshotter_ready, cache_errors = False, []
        for step in commands:
            word = keyword(step.instruction)
            log.info(step.instruction)
            time.sleep(pace.step(cached=word == "RUN" and step.instruction in cached))
            if word == "RUN" and step.instruction in cached:
                log.info("Found cached layer, extracting to filesystem")
            elif word == "RUN":
                if not snapshotter_ready:
                    log.info("Initializing snapshotter ...")
                    log.info("Taking snapshot of full filesystem...")
                    snapshotter_ready = True
                argv = _run_argv(step.instruction)
                log.info(f"Cmd: {argv[0]}")
                log.info(f"Args: {_go_list(argv[1:])}")
                log.info(f"Running: {_go_list(argv)}")
                if kill:
                    raise Killed(kill)
                if failure:
                    for output in failure.splitlines():
                        log.raw(output)
                    raise Exited(RUN_FAILED)
                for output in self.run_output.get(repository, "").splitlines():  # the command's own stdout
                    log.raw(output)
                log.info("Taking snapshot of full filesystem...")
                if cache_repo and flags["cache-run-layers"]:
                    cache_errors += self._push_to_cache(step, cache_repo, int(flags["push-retry"]), log)
            elif word == "EXPOSE":
                _expose(step.instruction, log)
            elif word == "WORKDIR":
                directory = step.instruction.split(None, 1)[1]
                log.info("Cmd: workdir")
                log.info(f"Changed working directory to {directory}")
                log.info(f"Creating directory {directory} with uid -1 and gid -1")
            if word in ("COPY", "ADD", "WORKDIR"):
                log.info("Taking snapshot of files...")
            elif word in METADATA_ONLY and cache_repo:
                log.info("No files changed in this command, skipping snapshotting.")
        if failure:
            for output in failure.splitlines():
                log.raw(output)
            raise Exited(RUN_FAILED)
        if cache_errors:
            log.warning(f"Error uploading layer to cache: {cache_errors[0]}")
        return sorted(cached)

    def _optimize(self, commands: list[Step], flags: dict, cache_repo: str, log: KanikoLog) -> set[str]:
        """build.go optimize: look each RUN up in the cache until the first miss; metadata commands run here too."""
        cached, stop = set(), False
        for step in commands:
            word = keyword(step.instruction)
            if word == "RUN" and flags["cache-run-layers"] and not stop:
                log.info(f"Checking for cached layer {cache_repo}:{step.key}...")
                if self._in_cache(cache_repo, step.key):
                    log.info(f"Using caching version of cmd: {step.instruction}")
                    cached.add(step.instruction)
                else:
                    log.info(f"No cached layer found for cmd {step.instruction}")
                    stop = True
            elif word == "EXPOSE":
                _expose(step.instruction, log)
        return cached

    def _in_cache(self, cache_repo: str, key: str) -> bool:
        """cache.go RegistryCache.RetrieveLayer: `<cache repo>:<key>` exists."""
        ecr = self.aws.client("ecr", self.region)
        repository = cache_repo.partition("/")[2]
        try:
            ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": key}])
        except (ecr.exceptions.ImageNotFoundException, ecr.exceptions.RepositoryNotFoundException):
            return False
        return True

    def _push_to_cache(self, step: Step, cache_repo: str, retries: int, log: KanikoLog) -> list[str]:
        """push.go pushLayerToCache: the RUN's layer as a one-layer image tagged with its cache key. A failure is
        retried `--push-retry` times (util.Retry, its waits left out) and returned, for a warning at the end."""
        destination = f"{cache_repo}:{step.key}"
        log.info(f"Pushing layer {destination} to cache now")
        manifest, digest = image_manifest([step], {}, "", DOCKER_V2)
        log.info(f"Pushing image to {destination}")
        registry, repository, _ = split_name(destination)
        for attempt in range(retries + 1):
            if push_manifest(self.aws, self.region, destination, manifest, digest):
                log.info(f"Pushed {cache_repo}@{digest}")
                return []
            error = (f"POST https://{registry}/v2/{repository}/blobs/uploads/: NAME_UNKNOWN: The repository with "
                     f"name '{repository}' does not exist in the registry with id '{registry.split('.', 1)[0]}'")
            if attempt < retries:
                log.warning(f"Retrying operation after {2 ** attempt}s due to {error}")
        return [f"failed to push to destination {destination}: {error}"]


def _mount_for(container: dict, path: str) -> dict:
    return next(m for m in container.get("volumeMounts", [])
                if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"))


def _one_repository(destinations: list[str]) -> str:
    repositories = sorted({name.rpartition(":")[0] for name in destinations})
    if len(repositories) != 1:
        raise Exited(f"sandbox kaniko: the destinations must name one repository, not {', '.join(repositories)}")
    return repositories[0]


def _registry(image: str) -> str:
    """The registry go-containerregistry's name.ParseReference finds in an image name."""
    first = image.split("/", 1)[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else "index.docker.io"


def _expose(instruction: str, log: KanikoLog) -> None:
    """commands/expose.go."""
    log.info("Cmd: EXPOSE")
    for port in instruction.split()[1:]:
        log.info(f"Adding exposed port: {port if '/' in port else port + '/tcp'}")
