"""Pre-flight checks of the pipeline file itself: pinned builder images, charts that render, values files helm reads.

Loading the file already refuses `latest`, a missing tag, a missing chart
folder or values file (bad input, before these checks run). What is left to
look at is what loads but still breaks or drifts: a moving tag such as
`master`, a chart that does not render with the release's values, a values
file helm cannot read.
"""

from __future__ import annotations

import re
import shlex

import yaml

from flows.build import buildkit_image
from flows.config import DEFAULT_BUILDKIT_IMAGE, DEFAULT_KANIKO_IMAGE, ComponentSpec, PipelineConfig, yaml_problem
from flows.doctor import Subject
from flows.doctor.findings import Finding, failed, passed, warned
from flows.helm import DeployFailed, helm_template_argv

# Tags their publishers move to newer images: moby/buildkit v0.31.2 README "Containerizing BuildKit" and
# .github/workflows/buildkit.yml ("versioning strategy": latest, rootless, master, nightly, and their -rootless /
# -ubuntu variants, besides the release tags vX.Y.Z[-rcN][-rootless|-ubuntu]); `buildx-stable-1` is the tag buildx
# follows. `latest` itself never loads (flows/config.py BuildSpec._pinned).
MOVING_TAGS = frozenset({"latest", "rootless", "master", "nightly", "latest-ubuntu", "master-rootless",
                         "master-ubuntu", "nightly-rootless", "nightly-ubuntu", "buildx-stable-1",
                         "buildx-stable-1-rootless", "edge", "stable", "main", "debug", "slim"})
RELEASE_TAG = re.compile(r"^v?\d+\.\d+\.\d+([-.+][0-9A-Za-z.-]+)?$")
IMAGE_KEYS = {"buildkit": ("build.image", DEFAULT_BUILDKIT_IMAGE),
              "kaniko": ("build.kaniko_image", DEFAULT_KANIKO_IMAGE)}


def tag_pinning(image: str) -> str:
    """"digest", "release" (a full version tag), "moving" (a tag its publisher moves) or "unknown"."""
    if "@sha256:" in image:
        return "digest"
    tag = image.rpartition(":")[2]
    if tag in MOVING_TAGS:
        return "moving"
    return "release" if RELEASE_TAG.match(tag) else "unknown"


def images_pinned(config: PipelineConfig) -> Finding:
    """The builder images the components use: a digest or a release tag passes, a moving tag fails, any other tag
    warns (a private mirror may well keep fixed tags of its own, which cannot be told from the name)."""
    check = "pipeline.images-pinned"
    builders = list(dict.fromkeys(config.builder_of(c) for c in config.components))
    images = {b: (buildkit_image(config.build) if b == "buildkit" else config.build.kaniko_image) for b in builders}
    moving = [b for b in builders if tag_pinning(images[b]) == "moving"]
    unknown = [b for b in builders if tag_pinning(images[b]) == "unknown"]
    if moving or unknown:
        worst = moving or unknown
        lines = [f"{IMAGE_KEYS[b][0]}: {IMAGE_KEYS[b][1]}   # or {IMAGE_KEYS[b][1]}@sha256:<digest>" for b in worst]
        said = "; ".join(f"{IMAGE_KEYS[b][0]} {images[b]} has a tag its publisher moves to newer builds"
                         for b in moving)
        said = said or "; ".join(f"{IMAGE_KEYS[b][0]} {images[b]}: the tag is not a release version, so it may move"
                                 for b in unknown)
        return (failed if moving else warned)(check, said, "in the pipeline file:\n" + "\n".join(lines))
    shown = ", ".join(f"{images[b]} ({'digest' if tag_pinning(images[b]) == 'digest' else 'release tag'})"
                      for b in builders)
    return passed(check, f"builder images pinned: {shown}")


def values_problems(config: PipelineConfig, subject: Subject) -> list[tuple[str, str]]:
    """(key, problem) for each values file helm would refuse: not a file, not YAML, not a mapping at the top
    (helm/helm v4.1.4 pkg/cli/values/options.go MergeValues: each `--values` file through loader.LoadValues into a
    map, else `failed to parse <file>`)."""
    problems = []
    for i, component in enumerate(config.components):
        for j, values in enumerate(component.release.values if component.release else []):
            key, path = f"components[{i}].release.values[{j}]", subject.source.path / values
            try:
                document = yaml.safe_load(path.read_text())
            except OSError as exc:
                problems.append((key, f"{values}: {exc.strerror or exc}"))
            except yaml.YAMLError as exc:
                problems.append((key, f"{values}: not valid YAML: {yaml_problem(exc)}"))
            else:
                if document is not None and not isinstance(document, dict):
                    problems.append((key, f"{values}: helm reads a values file as a mapping, this one is a "
                                          f"{type(document).__name__}"))
    return problems


def values_files(config: PipelineConfig, subject: Subject) -> Finding:
    check = "pipeline.values"
    count = sum(len(c.release.values) for c in config.components if c.release)
    if problems := values_problems(config, subject):
        return failed(check, "; ".join(f"{key}: {problem}" for key, problem in problems),
                      "\n".join(f"fix or replace the file named by {key} (commit it, then run doctor again)"
                                for key, _ in problems))
    return passed(check, f"{count} values file(s) in the checkout at {subject.source.commit[:12]} "
                  "read as YAML mappings")


def shown_command(argv: list[str], subject: Subject) -> str:
    """`helm template ...` as run in the root of the repository."""
    root = str(subject.source.path) + "/"
    return shlex.join([a.replace(root, "") for a in helm_template_argv("helm", argv)])


async def render(component: ComponentSpec, subject: Subject) -> str | None:
    """helm's error when the chart does not render with the release's values, `set` and placeholder secrets."""
    try:
        await subject.manifest(component)
    except DeployFailed as exc:
        return str(exc)
    return None


async def charts(config: PipelineConfig, subject: Subject) -> Finding:
    check = "pipeline.charts"
    releases = [(i, c) for i, c in enumerate(config.components) if c.release]
    if not releases:
        return passed(check, "no component has a release")
    broken = []
    for i, component in releases:
        if error := await render(component, subject):
            first = next((line for line in error.splitlines() if line.strip()), error)
            broken.append((i, component, first))
    if broken:
        said = "; ".join(f"components[{i}].release ({c.release.name}, chart {c.release.chart}) does not render: "
                         f"{error}" for i, c, error in broken)
        fixes = [f"make components[{i}].release render (its chart, values and set); see the error with:\n"
                 f"{shown_command(subject.upgrade_argv(c, 'helm', None), subject)}"
                 for i, c, _ in broken]
        return failed(check, said, "\n".join(fixes))
    return passed(check, f"{len(releases)} chart(s) render with `helm template`: "
                  + ", ".join(c.release.name for _, c in releases))


async def checks(subject: Subject) -> list[Finding]:
    config = subject.config
    return [images_pinned(config), values_files(config, subject), await charts(config, subject)]
