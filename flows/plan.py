"""What a run would do for each component, computed without AWS or a cluster.

`buildkit-pipeline plan` prints it; the flow builds its Jobs and helm commands
from the same functions, so the plan is exactly what a run creates.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flows.build import (
    CONTEXT_URL_PLACEHOLDER,
    BuildRequest,
    ImageRef,
    SecretFile,
    image_ref,
    job_name,
)
from flows.builders import job_manifest
from flows.config import Builder, ComponentSpec, ConfigError, PipelineConfig, check_paths, load_config
from flows.deploy import DIGEST_PLACEHOLDER
from flows.dockerignore import IgnoreFileError, load_ignore_file
from flows.helm import helm_upgrade_argv
from flows.package import PackagedContext, archive_paths, package_context
from flows.source import SourceCheckout, cache_root, checkout, public_url, resolve_repo


class ComponentPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    archive: PackagedContext
    request: BuildRequest
    job: dict
    helm: list[str] | None

    @property
    def image(self) -> ImageRef:
        return self.request.image


CONTEXT_SHA256_LABEL = "dev.buildkit-pipeline.context-sha256"


def archive_dir() -> Path:
    return cache_root() / "archives"


def registry_secret_name(job: str) -> str:
    return f"{job}-registry"


def component_labels(component: str, source: SourceCheckout, run_id: str) -> dict[str, str]:
    """Kubernetes labels of the build Job and its Pod."""
    return {
        "buildkit-pipeline/component": component,
        "buildkit-pipeline/commit": source.commit,
        "buildkit-pipeline/dirty": str(source.dirty).lower(),
        "buildkit-pipeline/flow-run": run_id[:63],
    }


def image_labels(source: SourceCheckout, archive: PackagedContext) -> dict[str, str]:
    """OCI labels on the built image: where it came from, and whether that was an uncommitted tree."""
    return {
        "org.opencontainers.image.revision": source.commit,
        "org.opencontainers.image.source": public_url(source.repo),
        CONTEXT_SHA256_LABEL: archive.sha256,
        "dev.buildkit-pipeline.dirty": str(source.dirty).lower(),
    }


def cache_repository(config: PipelineConfig, component: ComponentSpec) -> str | None:
    """Where the registry cache lives: the component's, the build's, or else the image's own repository."""
    if config.build.cache == "none":
        return None
    return f"{config.registry}/{component.cache_repository or config.build.cache_repository or component.image}"


def secret_files(component: ComponentSpec, job: str) -> list[SecretFile]:
    """Where each build secret is read from: its own Kubernetes Secret, or the build's Secret for AWS ones."""
    return [
        SecretFile(id=s.id, secret_name=s.kubernetes.name, key=s.kubernetes.key) if s.kubernetes
        else SecretFile(id=s.id, secret_name=f"{job}-secrets", key=s.id)
        for s in component.secrets
    ]


def plan_component(
    config: PipelineConfig,
    component: ComponentSpec,
    checkout: SourceCheckout,
    archive: PackagedContext,
    *,
    run_id: str,
    context_url: str = CONTEXT_URL_PLACEHOLDER,
    no_cache: bool = False,
    builder: Builder | None = None,
    comparison: bool = False,
) -> ComponentPlan:
    """The component's build Job and helm argv. `builder` overrides the configured one; a `comparison` build
    is tagged `<commit12>-<builder>` only, so it never takes the place of a release's image."""
    builder = builder or config.builder_of(component)
    image = image_ref(config.image_repository(component), checkout.commit, archive.sha256,
                      dirty=checkout.dirty, latest=component.tag_latest)
    if comparison:
        image = ImageRef(repository=image.repository, tags=[f"{image.tags[0]}-{builder}"])
    name = job_name(component.name, archive.sha256, run_id, builder)
    request = BuildRequest(
        name=name,
        builder=builder,
        settings=config.build,
        context_url=context_url,
        archive=archive,
        image=image,
        registry_secret=registry_secret_name(name),
        cache_repository=cache_repository(config, component),
        no_cache=no_cache,
        platforms=config.platforms_of(component),
        build_args=component.build_args,
        target=component.target,
        secrets=secret_files(component, name),
        labels=component_labels(component.name, checkout, run_id),
        image_labels=image_labels(checkout, archive),
    )
    helm = None
    if component.release:
        helm = helm_upgrade_argv(
            component.release,
            repo_root=checkout.path,
            image_repository=image.repository,
            image_tag=f"{image.tags[0]}@{DIGEST_PLACEHOLDER}",
        )
    return ComponentPlan(name=component.name, archive=archive, request=request, job=job_manifest(request),
                         helm=helm)


def select(config: PipelineConfig, names: list[str] | None) -> list[ComponentSpec]:
    if not names:
        return list(config.components)
    unknown = sorted(set(names) - {c.name for c in config.components})
    if unknown:
        raise ValueError(f"components: no component named {', '.join(map(repr, unknown))}")
    return [c for c in config.components if c.name in names]


def prepare_source(config_path: Path, ref: str | None = None) -> tuple[PipelineConfig, SourceCheckout]:
    config = load_config(config_path)
    repo = resolve_repo(config.source.repo, Path(config_path).resolve().parent)
    source = checkout(repo, ref or config.source.ref)
    check_paths(config, source.path)
    check_ignore_files(config, source.path)
    return config, source


def check_ignore_files(config: PipelineConfig, repo_root: Path) -> None:
    """Every component's ignore file reads and compiles as BuildKit would take it, before any run starts.

    BuildKit fails a build whose ignore file it cannot use; here that is bad input,
    reported with the component's key and the file relative to the repository.
    """
    problems = []
    for i, component in enumerate(config.components):
        context = repo_root / component.context
        try:
            load_ignore_file(context, context / component.dockerfile)
        except IgnoreFileError as error:
            shown = _relative_to(str(error.path), repo_root)
            problems.append(f"components[{i}].context: {shown}: {error.detail}")
    if problems:
        raise ConfigError(problems)


def package_component(config: PipelineConfig, component: ComponentSpec, source: SourceCheckout) -> PackagedContext:
    context = source.path / component.context
    return package_context(
        context, context / component.dockerfile, archive_dir(), max_bytes=config.build.max_context_bytes
    )


def _relative_to(path: str, root: Path) -> str:
    """`path` relative to the checkout when inside it ("" when no ignore file applied)."""
    if not path:
        return ""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def make_plan(
    config_path: Path, ref: str | None = None, components: list[str] | None = None, *, list_files: bool = False
) -> dict:
    """The `plan --json` document: the source, and per component its archive, image, Job and helm argv."""
    config, source = prepare_source(config_path, ref)
    plans = []
    for component in select(config, components):
        archive = package_component(config, component, source)
        plan = plan_component(config, component, source, archive, run_id="plan")
        plans.append({
            "name": plan.name,
            "archive": {
                "sha256": archive.sha256,
                "bytes": archive.bytes,
                "files": archive.files,
                "dockerfile": archive.dockerfile,
                "contextsubdir": archive.contextsubdir,
                "ignore_file": _relative_to(archive.ignore_file, source.path),
                **({"paths": archive_paths(archive.path)} if list_files else {}),
            },
            "image": {"repository": plan.image.repository, "tags": plan.image.tags},
            "builder": plan.request.builder,
            "job": plan.job,
            "helm": plan.helm,
        })
    return {
        "commit": source.commit,
        "ref": source.ref,
        "source": {"repo": public_url(source.repo), "ref": source.ref, "commit": source.commit, "dirty": source.dirty},
        "components": plans,
    }
