"""The pipeline file: what to build, where to push it and how to release it.

Everything here is checked before any remote side effect; every error names the
key it is about (`components[1].release.chart: no such directory`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flows.source import ref_problem

DEFAULT_BUILDKIT_IMAGE = "moby/buildkit:v0.31.2"
# The maintained fork's executor: osscontainertools/kaniko publishes each release tag `v1.X.Y` on ghcr.io
# (.github/workflows/images.yaml, "Apply release tags"); patch releases change no behaviour (docs/releases.md).
# The original gcr.io/kaniko-project images are archived and no longer updated.
DEFAULT_KANIKO_IMAGE = "ghcr.io/osscontainertools/kaniko:v1.28.3"
Builder = Literal["buildkit", "kaniko"]
# After a Job ends the flow drains the log (2 s), lists the Pods for the termination message and, on failure, reads
# the log tail and the events; each request retries transient errors for up to 7.5 s (flows/kube.py RETRY_DELAYS)
# and the build task twice more after 1 s and 5 s, adopting the finished Job by name: about 40 s when every call
# meets a transient error. Five minutes leaves room for Retry-After answers and a slow worker.
MIN_FINISHED_JOB_SECONDS = 300
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
_HOST_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
REGISTRY_HOST = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*(:\d{{1,5}})?$")


class ConfigError(ValueError):
    """A pipeline file that cannot be used; each line names the offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _dns_label(value: str) -> str:
    if not DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a DNS label (lowercase letters, digits and '-', at most 63)")
    return value


class SourceSpec(_Strict):
    repo: str = Field(description="git URL (https, ssh, file) or a local path, relative to the pipeline file")
    ref: str = Field(default="main", description="branch, tag or full commit SHA")

    @field_validator("ref")
    @classmethod
    def _ref(cls, ref: str) -> str:
        if problem := ref_problem(ref):
            raise ValueError(f"{ref!r} is not a branch, tag or commit SHA: it {problem}")
        return ref


class AwsSpec(_Strict):
    region: str
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = "build/"
    presign_ttl_seconds: int = Field(default=900, ge=60, le=43200)


REPOSITORY = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")
SECRET_ID = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def _repository(image: str | None) -> str | None:
    if image is not None and not REPOSITORY.match(image):
        raise ValueError(f"{image!r} is not a repository name (lowercase, no tag)")
    return image


def _platforms(platforms: list[str] | None) -> list[str] | None:
    for platform in platforms or []:
        if not PLATFORM.match(platform):
            raise ValueError(f"{platform!r} is not a platform like linux/amd64 or linux/arm64/v8")
    return platforms


class KubernetesSecretRef(_Strict):
    name: str
    key: str


class BuildSecretSpec(_Strict):
    """A file the Dockerfile reads with `RUN --mount=type=secret,id=<id>`; never part of the image."""

    id: str
    kubernetes: KubernetesSecretRef | None = Field(default=None, description="a Secret in the build namespace")
    aws_secrets_manager: str | None = Field(default=None, description="a Secrets Manager secret id or ARN")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not SECRET_ID.match(value):
            raise ValueError(f"{value!r} is not a secret id (letters, digits, '.', '_', '-')")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> BuildSecretSpec:
        if (self.kubernetes is None) == (self.aws_secrets_manager is None):
            raise ValueError("give exactly one of kubernetes or aws_secrets_manager")
        return self


class ResourcesSpec(_Strict):
    requests: dict[str, str] = Field(default_factory=lambda: {"cpu": "1", "memory": "2Gi"})
    limits: dict[str, str] = Field(default_factory=lambda: {"memory": "8Gi"})


class BuildSpec(_Strict):
    builder: Builder = "buildkit"
    namespace: str = "build"
    service_account: str = "buildkit"
    image: str = DEFAULT_BUILDKIT_IMAGE
    mode: Literal["privileged", "rootless"] = Field(default="privileged", description="BuildKit only")
    kaniko_image: str = Field(default=DEFAULT_KANIKO_IMAGE, description="the Kaniko executor (or a fork), pinned")
    timeout_seconds: int = Field(default=1800, ge=30, description="the Job's activeDeadlineSeconds")
    pending_timeout_seconds: int = Field(default=300, ge=10, description="how long a build pod may stay unstarted "
                                         "(image pull back-off, unschedulable without a node being provisioned)")
    max_context_bytes: int = Field(default=1 << 30, ge=1, description="largest context archive to upload")
    cache: Literal["registry", "none"] = "registry"
    cache_repository: str | None = Field(default=None, description="repository for the cache (default: the image's)")
    state_volume_claim: str | None = Field(default=None, description="a PVC for buildkitd's state (default: emptyDir)")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict] = Field(default_factory=list)
    ttl_seconds_after_finished: int = Field(default=3600, description="how long a finished Job and its Pod stay")
    platforms: list[str] = Field(default_factory=list)

    _namespace = field_validator("namespace", "service_account")(_dns_label)
    _cache_repository = field_validator("cache_repository")(_repository)
    _platform_list = field_validator("platforms")(_platforms)

    @field_validator("ttl_seconds_after_finished")
    @classmethod
    def _kept_long_enough(cls, seconds: int) -> int:
        """Kubernetes deletes a finished Job and its Pod this long after the Job ends; the flow reads them after that."""
        if seconds < MIN_FINISHED_JOB_SECONDS:
            raise ValueError(
                f"{seconds} is too short: once the Job ends the flow still reads its Pod's termination message (the "
                "pushed digest), log tail and events, retrying transient API errors, and a Job deleted before then "
                f"turns a good build into a failed one; use at least {MIN_FINISHED_JOB_SECONDS}"
            )
        return seconds

    @field_validator("image", "kaniko_image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        name, _, tag = image.rpartition(":")
        if "@sha256:" in image:
            return image
        if not name or "/" in tag or tag in ("", "latest"):
            raise ValueError(f"{image!r} must be pinned to a version tag or digest, never latest")
        return image


SERVICE_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")
# A path under a Service's proxy subresource. Dot segments (also percent-encoded) are refused: an HTTP client
# removes them (RFC 3986 5.2.4), and `/proxy/../../secrets/x` would become a request to the API itself, made
# with the flow's credentials.
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(/|$|\?)", re.IGNORECASE)


def _proxied_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} must start with '/'")
    if _DOT_SEGMENT.search(path) or "%2f" in path.lower():
        raise ValueError(f"{path!r} must not contain '.' or '..' segments or an encoded '/'")
    if any(c.isspace() or c == "#" for c in path):
        raise ValueError(f"{path!r} must not contain whitespace or '#'")
    return path


def _service_port(port: int | str) -> int | str:
    """A Service port by number or by name (an IANA_SVC_NAME, as the API server validates port names)."""
    if isinstance(port, int):
        if not 1 <= port <= 65535:
            raise ValueError(f"{port} is not a port number (1 to 65535)")
    elif not SERVICE_PORT_NAME.match(port) or "--" in port:
        raise ValueError(f"{port!r} is not a port number or a Service port name")
    return port


class McpCheckSpec(_Strict):
    """An MCP server that must answer the handshake (initialize, initialized, tools/list) through the Service."""

    service: str = Field(description="a Service in the release's namespace")
    port: int | str = Field(description="the Service's port, by number or name")
    path: str = "/mcp"
    tools: list[str] = Field(default_factory=list, description="tools the server must list (empty: at least one)")

    _service = field_validator("service")(_dns_label)
    _port = field_validator("port")(_service_port)
    _path = field_validator("path")(_proxied_path)


class HttpCheckSpec(_Strict):
    """A GET through the Service that must answer with `status`."""

    service: str
    port: int | str
    path: str = "/"
    status: int = Field(default=200, ge=100, le=599)

    _service = field_validator("service")(_dns_label)
    _port = field_validator("port")(_service_port)
    _path = field_validator("path")(_proxied_path)


class VerifySpec(_Strict):
    """Checks after a release rolled out; a failing one puts the release back on its previous revision."""

    helm_test: bool | None = Field(default=None, description="run `helm test`; default: when the installed "
                                   "release has test hooks")
    mcp: McpCheckSpec | None = None
    http: list[HttpCheckSpec] = Field(default_factory=list)
    timeout_seconds: int = Field(default=120, ge=5, le=3600, description="for each check (helm test's --timeout)")


class ReleaseSpec(_Strict):
    name: str
    chart: str = Field(description="chart folder relative to the repo root, an oci:// reference, or a chart in `repo`")
    repo: str | None = Field(default=None, description="chart repository URL, for a chart name")
    version: str | None = Field(default=None, description="chart version; required for oci:// and repo charts")
    namespace: str = "default"
    values: list[str] = Field(default_factory=list, description="values files, relative to the repo root")
    set: dict[str, str] = Field(default_factory=dict)
    set_secret: dict[str, str] = Field(default_factory=dict, description="value key -> Prefect Secret block name")
    after: list[str] = Field(default_factory=list, description="releases that must be deployed first")
    timeout_seconds: int = Field(default=300, ge=10)
    create_namespace: bool = Field(default=False, description="helm creates the namespace (`--create-namespace`); "
                                   "needs deployments/rbac-create-namespace.yaml")
    verify: VerifySpec = Field(default_factory=VerifySpec, description="checks after the rollout")

    _names = field_validator("name", "namespace")(_dns_label)

    @property
    def local_chart(self) -> bool:
        return not self.chart.startswith("oci://") and self.repo is None

    @model_validator(mode="after")
    def _pinned_remote_chart(self) -> ReleaseSpec:
        if not self.local_chart and not self.version:
            raise ValueError(f"chart {self.chart!r} is not in the repository: pin it with `version`")
        overlap = sorted(set(self.set) & set(self.set_secret))
        if overlap:
            raise ValueError(f"{', '.join(overlap)} set both in `set` and `set_secret`")
        return self


class ComponentSpec(_Strict):
    name: str
    context: str = Field(description="build context folder, relative to the repo root")
    dockerfile: str = Field(default="Dockerfile", description="relative to the context")
    image: str = Field(description="repository under `registry`")
    release: ReleaseSpec | None = None
    platforms: list[str] | None = Field(default=None, description="overrides build.platforms")
    build_args: dict[str, str] = Field(default_factory=dict)
    target: str | None = Field(default=None, description="the Dockerfile stage to build")
    secrets: list[BuildSecretSpec] = Field(default_factory=list)
    tag_latest: bool = False
    cache_repository: str | None = Field(default=None, description="overrides build.cache_repository")
    builder: Builder | None = Field(default=None, description="overrides build.builder")

    _name = field_validator("name")(_dns_label)
    _image = field_validator("image", "cache_repository")(_repository)
    _platform_list = field_validator("platforms")(_platforms)


class PipelineConfig(_Strict):
    source: SourceSpec
    registry: str
    aws: AwsSpec
    build: BuildSpec = Field(default_factory=BuildSpec)
    components: list[ComponentSpec] = Field(min_length=1)

    @field_validator("registry")
    @classmethod
    def _registry_host(cls, registry: str) -> str:
        """A host as Docker's reference grammar has it: an image name is `<registry>/<repository>:<tag>`."""
        if not REGISTRY_HOST.fullmatch(registry):
            raise ValueError(f"{registry!r} must be a registry host, like 123456789012.dkr.ecr.us-west-2.amazonaws.com")
        return registry

    @model_validator(mode="after")
    def _references(self) -> PipelineConfig:
        problems = []
        first_with_name: dict[str, int] = {}
        releases = {c.release.name: i for i, c in enumerate(self.components) if c.release}
        for i, component in enumerate(self.components):
            if component.name in first_with_name:
                problems.append(f"components[{i}].name: {component.name!r} is already the name of "
                                f"components[{first_with_name[component.name]}]")
            first_with_name.setdefault(component.name, i)
            for dependency in component.release.after if component.release else []:
                if dependency not in releases:
                    problems.append(f"components[{i}].release.after: no release named {dependency!r}")
            if self.builder_of(component) == "kaniko":
                problems += [f"components[{i}].{problem}" for problem in self.kaniko_limits(component)]
        if problems:
            raise ValueError("\n".join(problems))
        if cycle := _release_cycle(self.components):
            first = next(i for i, c in enumerate(self.components) if c.release and c.release.name == cycle[0])
            raise ValueError(f"components[{first}].release.after: release order has a cycle: {' -> '.join(cycle)}")
        return self

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)

    def builder_of(self, component: ComponentSpec) -> Builder:
        return component.builder or self.build.builder

    def platforms_of(self, component: ComponentSpec) -> list[str]:
        return component.platforms if component.platforms is not None else self.build.platforms

    def kaniko_limits(self, component: ComponentSpec) -> list[str]:
        """What this component needs that Kaniko cannot do, each as `<key>: <why>`."""
        problems = []
        if component.secrets:
            problems.append("secrets: Kaniko cannot mount build secrets (RUN --mount=type=secret); "
                            "build this component with buildkit")
        if len(self.platforms_of(component)) > 1:
            problems.append("platforms: Kaniko builds one platform per Job; "
                            "build a multi-platform image with buildkit")
        return problems

    def image_repository(self, component: ComponentSpec) -> str:
        return f"{self.registry}/{component.image}"


def _release_cycle(components: list[ComponentSpec]) -> list[str] | None:
    after = {c.release.name: c.release.after for c in components if c.release}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if state.get(name) == "open":
            return trail[trail.index(name):] + [name]
        if state.get(name) == "done":
            return None
        state[name] = "open"
        for dependency in after.get(name, []):
            if found := visit(dependency, trail + [name]):
                return found
        state[name] = "done"
        return None

    for name in after:
        if found := visit(name, []):
            return found
    return None


def _location(loc: tuple) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: dict) -> str:
    loc = _location(tuple(p for p in error["loc"] if p not in ("function-after", "function-before")))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{loc}: {message}" if loc else message


def parse_config(data: object) -> PipelineConfig:
    """Validate an already-loaded pipeline document."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([line for error in exc.errors() for line in _describe(error).splitlines()]) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found and where, without the lines it quotes: the file may not be a pipeline file at all."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(path: Path) -> PipelineConfig:
    """Read and validate a pipeline file (YAML)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {yaml_problem(exc)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    return parse_config(data)


def check_paths(config: PipelineConfig, repo_root: Path) -> None:
    """Check that every folder and file the pipeline names exists inside the checkout.

    Paths are resolved, symlinks included, before the containment check: neither
    `../` nor a link may make a run package or deploy files from outside the
    repository, such as the worker's own.
    """
    root = repo_root.resolve()
    problems = []

    def found(key: str, relative: str, base: Path, exists: Callable[[Path], bool], missing: str) -> Path | None:
        candidate = (base / relative).resolve()
        if not candidate.is_relative_to(root):
            problems.append(f"{key}: {relative!r} is outside the repository")
        elif not exists(candidate):
            problems.append(f"{key}: {missing}")
        else:
            return candidate
        return None

    for i, component in enumerate(config.components):
        key = f"components[{i}]"
        context = found(f"{key}.context", component.context, root, Path.is_dir,
                        f"no such directory {component.context!r}")
        if context is not None:
            found(f"{key}.dockerfile", component.dockerfile, context, Path.is_file,
                  f"no such file {component.dockerfile!r} in {component.context!r}")
        release = component.release
        if release and release.local_chart:
            found(f"{key}.release.chart", release.chart, root, lambda chart: (chart / "Chart.yaml").is_file(),
                  f"no such directory {release.chart!r} (with a Chart.yaml)")
        for j, values in enumerate(release.values if release else []):
            found(f"{key}.release.values[{j}]", values, root, Path.is_file, f"no such file {values!r}")
    if problems:
        raise ConfigError(problems)
