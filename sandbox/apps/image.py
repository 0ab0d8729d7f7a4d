"""An image's runtime config from the Dockerfile a simulated build made it of, and the argv a container runs.

Sources:
- Dockerfile reference (docs.docker.com/reference/dockerfile) and moby/buildkit v0.31
  frontend/dockerfile/instructions/parse.go (`parseMaybeJSON`: an argument that parses as a JSON array of strings
  is the exec form, anything else the shell form, run as `SHELL` + the text, `["/bin/sh", "-c"]` by default) and
  frontend/dockerfile/dockerfile2llb/convert.go (`dispatchEntrypoint` clears a CMD inherited from the base image,
  not one set in the same stage; `dispatchWorkdir` resolves a relative WORKDIR against the previous one; ENV
  values are expanded against the environment so far).
- The container's argv (kubernetes.io "Define a Command and Arguments for a Container", done by containerd
  internal/cri/opts/spec.go WithProcessArgs v2.1): `command` replaces ENTRYPOINT and drops the image's CMD;
  `args` alone replaces CMD and keeps ENTRYPOINT.
- The base image's config: docker-library/python (3.12 slim) sets `PATH=/usr/local/bin:...`, `LANG=C.UTF-8` and
  `CMD ["python3"]`; any other base gets Docker's default PATH and nothing else.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field, replace

from sandbox.builders import keyword

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ("/bin/sh", "-c")
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:[-+][^}]*)?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class ImageConfig:
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    shell: tuple[str, ...] = DEFAULT_SHELL
    exposed: tuple[int, ...] = ()
    copies: tuple[tuple[tuple[str, ...], str], ...] = ()
    """(sources, destination) of each COPY/ADD from the context, in order; destinations are absolute."""


def base_config(image: str) -> ImageConfig:
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    if name.split(":", 1)[0] == "python":
        return ImageConfig(env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, cmd=("python3",))
    return ImageConfig(env={"PATH": DEFAULT_PATH})


def expand(text: str, env: dict[str, str]) -> str:
    """Dockerfile variable substitution: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alternative}`."""
    def one(found: re.Match) -> str:
        name = found["braced"] or found["bare"]
        modifier = found["modifier"]
        value = env.get(name, "")
        if modifier and modifier.startswith(":-"):
            return value or modifier[2:]
        if modifier and modifier.startswith(":+"):
            return modifier[2:] if value else ""
        return value
    return _VARIABLE.sub(one, text)


def _maybe_json(rest: str) -> tuple[str, ...] | None:
    """parse.go parseMaybeJSON: the exec form when the text is a JSON array of strings."""
    if rest.lstrip().startswith("["):
        try:
            parsed = json.loads(rest)
        except ValueError:
            return None
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return tuple(parsed)
    return None


def _command(rest: str, shell: tuple[str, ...]) -> tuple[str, ...]:
    exec_form = _maybe_json(rest)
    return exec_form if exec_form is not None else (*shell, rest)


def _env_pairs(rest: str) -> list[tuple[str, str]]:
    words = shlex.split(rest, posix=True)
    if words and "=" not in words[0]:  # the legacy `ENV key value with spaces`
        key, _, value = rest.strip().partition(" ")
        return [(key, value.strip())]
    return [tuple(word.split("=", 1)) for word in words]  # type: ignore[misc]


def _stages(instructions: list[str]) -> list[tuple[str, str | None, list[str]]]:
    """(base image, alias, the stage's instructions after FROM) per stage."""
    stages: list[tuple[str, str | None, list[str]]] = []
    for instruction in instructions:
        if keyword(instruction) == "FROM":
            words = [w for w in instruction.split()[1:] if not w.startswith("--")]
            alias = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append((words[0], alias, []))
        elif stages:
            stages[-1][2].append(instruction)
    return stages


def image_config(instructions: list[str], build_args: dict[str, str] | None = None) -> ImageConfig:
    """The config of the image the Dockerfile's last stage makes (a stage FROM an earlier one inherits it)."""
    configs: dict[str, ImageConfig] = {}
    config = ImageConfig()
    for base, alias, body in _stages(instructions):
        config = configs.get(base.lower()) or base_config(base)
        cmd_set = False
        args = dict(build_args or {})
        for instruction in body:
            word, _, rest = instruction.partition(" ")
            word, rest = word.upper(), rest.strip()
            scope = {**args, **config.env}
            if word == "WORKDIR":
                config = replace(config, workdir=posixpath.normpath(posixpath.join(config.workdir,
                                                                                   expand(rest, scope))))
            elif word == "ENV":
                env = dict(config.env)
                for key, value in _env_pairs(rest):
                    env[key] = expand(value, {**args, **env})
                config = replace(config, env=env)
            elif word == "ARG":
                name, _, default = rest.partition("=")
                args.setdefault(name.strip(), default.strip().strip('"'))
            elif word == "SHELL":
                config = replace(config, shell=_maybe_json(rest) or DEFAULT_SHELL)
            elif word == "CMD":
                config, cmd_set = replace(config, cmd=_command(rest, config.shell)), True
            elif word == "ENTRYPOINT":
                config = replace(config, entrypoint=_command(rest, config.shell),
                                 cmd=config.cmd if cmd_set else None)
            elif word == "EXPOSE":
                ports = tuple(int(p.split("/", 1)[0]) for p in rest.split() if p.split("/", 1)[0].isdigit())
                config = replace(config, exposed=config.exposed + ports)
            elif word in ("COPY", "ADD"):
                words = _maybe_json(rest) or tuple(shlex.split(rest))
                if any(w.startswith("--from") for w in words):
                    continue
                paths = [w for w in words if not w.startswith("--")]
                if len(paths) >= 2:
                    destination = expand(paths[-1], scope)
                    absolute = posixpath.join(config.workdir, destination)
                    if destination.endswith("/") or destination in (".", "./"):
                        absolute = absolute.rstrip("/") + "/"
                    config = replace(config, copies=config.copies + ((tuple(paths[:-1]), absolute),))
        if alias:
            configs[alias] = config
    return config


def container_argv(config: ImageConfig, command: list[str], args: list[str]) -> list[str]:
    """WithProcessArgs: what the container's process runs."""
    if command:
        return [*command, *args]
    return [*(config.entrypoint or ()), *(args or config.cmd or ())]
