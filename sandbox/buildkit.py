"""A stand-in for the BuildKit pod that checks the contract the real pod depends on.

It plays the part of `buildctl-daemonless.sh build ...` inside the emulated
cluster: it reads the Pod spec the way the kubelet would hand it to the
container, downloads the presigned context URL, checks the archive layout the
dockerfile frontend expects, checks the mounted registry config against a token
minted from the same account, "pushes" the image to the sandbox ECR, and writes
buildctl's metadata JSON as the termination message. A broken contract fails
the pod with the error text real BuildKit would print.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field

from sandbox.aws import AwsSandbox
from sandbox.kube import KubeEmulator, PodHandle


class ContractError(Exception):
    """What real BuildKit would have failed with."""


def is_buildkit_pod(pod: dict) -> bool:
    containers = pod.get("spec", {}).get("containers", [])
    return any("buildkit" in c.get("image", "") for c in containers)


def parse_buildctl(args: list[str]) -> tuple[dict[str, str], dict[str, str], str]:
    """`--opt k=v` options, the `--output` attributes and the metadata file of a `buildctl build` argv."""
    opts, output, metadata = {}, {}, ""
    it = iter(args)
    for arg in it:
        if arg == "--opt":
            key, _, value = next(it).partition("=")
            opts[key] = value
        elif arg == "--output":
            for part in _csv(next(it)):
                key, _, value = part.partition("=")
                output[key] = value
        elif arg == "--metadata-file":
            metadata = next(it)
    return opts, output, metadata


def _csv(text: str) -> list[str]:
    return next(csv.reader([text]))


@dataclass
class SimulatedBuildKit:
    emulator: KubeEmulator
    aws: AwsSandbox
    region: str = "us-west-2"
    build_seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    builds: list[dict] = field(default_factory=list)

    def install(self) -> None:
        self.emulator.on_pod(is_buildkit_pod, self.run)

    def run(self, handle: PodHandle) -> None:
        handle.running()
        started = time.monotonic()
        try:
            record = self._build(handle)
        except ContractError as exc:
            handle.log(f"error: {exc}")
            handle.terminate(1, message=f"error: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - any surprise is a failed build, as in a real pod
            handle.log(f"error: sandbox buildkit: {type(exc).__name__}: {exc}")
            handle.terminate(1, message=f"error: {exc}")
            return
        record["seconds"] = time.monotonic() - started
        self.builds.append(record)
        handle.terminate(0, message=json.dumps(record["metadata"]))

    def _build(self, handle: PodHandle) -> dict:
        spec = handle.pod["spec"]
        if spec.get("initContainers"):
            raise ContractError("the build pod must have no init containers")
        if len(spec["containers"]) != 1:
            raise ContractError("the build pod must have exactly one container")
        container = spec["containers"][0]
        if container.get("command") != ["buildctl-daemonless.sh"] or container["args"][0] != "build":
            raise ContractError(f"unexpected command {container.get('command')} {container.get('args', [])[:1]}")
        _check_security(container)
        opts, output, metadata_file = parse_buildctl(container["args"][1:])
        if metadata_file != container.get("terminationMessagePath", "/dev/termination-log"):
            raise ContractError("--metadata-file must be the termination message path")
        auth = self._mounted_registry_auth(handle, container)
        names = output.get("name", "").split(",")
        registry = names[0].split("/", 1)[0]
        if auth.get(registry) != self._minted_token(registry):
            raise ContractError(
                f"failed to push {names[0]}: unexpected status from HEAD request: 401 Unauthorized"
            )
        handle.log("#1 [internal] load remote build context")
        archive = _download(opts.get("context", ""))
        handle.log(f"#1 DONE {len(archive)} bytes")
        dockerfile = _check_layout(archive, opts.get("filename", "Dockerfile"), opts.get("contextsubdir", ""))
        step = 2
        for line in dockerfile.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                handle.log(f"#{step} [{step - 1}/?] {line.strip()}")
                handle.log(f"#{step} DONE 0.0s")
                step += 1
        repository = names[0].rsplit(":", 1)[0]
        if repository in self.failures:
            raise ContractError(self.failures[repository])
        time.sleep(self.build_seconds.get(repository, 0.0))
        digest = "sha256:" + hashlib.sha256(archive + repository.encode()).hexdigest()
        handle.log(f"#{step} exporting to image")
        self._push(names, digest)
        handle.log(f"#{step} pushing manifest for {names[0]}@{digest} done")
        handle.log(f"#{step} DONE 0.1s")
        return {
            "pod": handle.name,
            "context_url": opts["context"],
            "names": names,
            "metadata": {"containerimage.digest": digest, "image.name": ",".join(names)},
        }

    def _mounted_registry_auth(self, handle: PodHandle, container: dict) -> dict[str, str]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        config_dir = env.get("DOCKER_CONFIG")
        if not config_dir:
            raise ContractError("DOCKER_CONFIG is not set: buildctl will find no registry credentials")
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == config_dir), None)
        volume = mount and next((v for v in handle.pod["spec"].get("volumes", []) if v["name"] == mount["name"]), None)
        if not volume or "secret" not in volume:
            raise ContractError(f"no Secret is mounted at $DOCKER_CONFIG ({config_dir})")
        items = {i["key"]: i["path"] for i in volume["secret"].get("items", [])}
        if items.get(".dockerconfigjson") != "config.json":
            raise ContractError("the Secret's .dockerconfigjson must be mounted as config.json")
        secret = self.emulator.get("secrets", handle.namespace, volume["secret"]["secretName"])
        if secret is None:
            raise ContractError(f'secret "{volume["secret"]["secretName"]}" not found')
        config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
        return {host: entry.get("auth") for host, entry in config.get("auths", {}).items()}

    def _minted_token(self, registry: str) -> str:
        account = registry.split(".", 1)[0]
        ecr = self.aws.client("ecr", self.region)
        return ecr.get_authorization_token(registryIds=[account])["authorizationData"][0]["authorizationToken"]

    def _push(self, names: list[str], digest: str) -> None:
        ecr = self.aws.client("ecr", self.region)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"})
        for name in names:
            repository, _, tag = name.partition("/")[2].rpartition(":")
            try:
                ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag, imageDigest=digest)
            except ecr.exceptions.ImageAlreadyExistsException:
                pass
            except ecr.exceptions.RepositoryNotFoundException:
                raise ContractError(
                    f"failed to push {name}: name unknown: The repository with name '{repository}' does not exist"
                ) from None


def _check_security(container: dict) -> None:
    security = container.get("securityContext", {})
    if container["image"].endswith("-rootless"):
        if security.get("runAsUser") != 1000:
            raise ContractError("rootless buildkit must run as uid 1000")
    elif not security.get("privileged"):
        raise ContractError(
            "buildkitd: failed to create worker: mount proc: operation not permitted (the pod is not privileged)"
        )


def _download(url: str) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise ContractError(f"context {url!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()
    except OSError as exc:
        raise ContractError(f"failed to read remote context: {exc}") from None


def _check_layout(archive: bytes, filename: str, contextsubdir: str) -> str:
    """The Dockerfile the frontend would read, after checking what it needs is where it looks."""
    if archive[:2] != b"\x1f\x8b":
        raise ContractError("remote context is not a gzip-compressed tar archive")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive)), mode="r:") as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        if filename not in members or not members[filename].isfile():
            raise ContractError(
                f"failed to solve: failed to read dockerfile: open {filename}: no such file or directory"
            )
        if contextsubdir and not any(name == contextsubdir or name.startswith(contextsubdir + "/") for name in members):
            raise ContractError(f"failed to solve: contextsubdir {contextsubdir!r} not found in the context")
        return tar.extractfile(members[filename]).read().decode()
