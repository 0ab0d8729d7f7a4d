"""What stands between a new Pod and its first running container, as pure functions of the Pod and the cluster:
the scheduler's filter verdict, the kubelet's Secret volume mounts, its image pulls and its env Secret lookups.

Texts, with their sources (kubernetes/kubernetes unless named):
- pkg/scheduler/framework (v1.33): `0/N nodes are available: <count> <reason>[, ...]. preemption: 0/N nodes are
  available: N Preemption is not helpful for scheduling.`, the plugins TaintToleration (`node(s) had untolerated
  taint {key: value}`), NodeAffinity (`node(s) didn't match Pod's node affinity/selector`) and NodeResourcesFit
  (`Insufficient cpu`), which run in that order; a node fails on the first plugin that rejects it.
- pkg/volume/secret/secret.go with the kubelet's secret manager (its NotFound is for the resource `secret`) and
  the operation executor: `MountVolume.SetUp failed for volume "v" : secret "s" not found`, and
  `references non-existent secret key: k` for an item whose key is missing.
- pkg/kubelet/images/image_manager.go: `Failed to pull image "x": <err>` and `Back-off pulling image "x"`;
  containerd (v1.7/2.x) answers a missing image with `rpc error: code = NotFound desc = failed to pull and unpack
  image "<ref>": failed to resolve reference "<ref>": <ref>: not found`, `<ref>` being the normalised name.
- pkg/kubelet/kubelet_pods.go makeEnvironmentVariables: the secret manager's `secret "s" not found`, and
  `couldn't find key k in Secret ns/s`; the container waits with CreateContainerConfigError.
- The container's environment and argv (kubernetes/kubernetes v1.35: pkg/kubelet/kubelet_pods.go
  makeEnvironmentVariables, pkg/kubelet/container/helpers.go ExpandContainerCommandAndArgs,
  third_party/forked/golang/expansion/expand.go): `env` in declaration order, a `value` expanded against the
  variables declared before it, a `secretKeyRef` taken as the Secret's bytes and never expanded; then every
  `command` and `args` item expanded once against that environment. `$(VAR)` of a defined variable is its value,
  of an undefined one stays as written, `$$` is `$`, any other `$` is kept; a value put in is not expanded again.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

GetSecret = Callable[[str], dict | None]
OPERATOR, OPENER, CLOSER = "$", "(", ")"
UNITS = {"": 1, "m": 0.001, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
         "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def quantity(text) -> float:
    text = str(text)
    for suffix in sorted(UNITS, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return float(text[: -len(suffix)]) * UNITS[suffix]
    return float(text)


def _untolerated(node: dict, pod_spec: dict) -> dict | None:
    tolerations = pod_spec.get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(_tolerates(t, taint) for t in tolerations):
            return taint
    return None


def _tolerates(toleration: dict, taint: dict) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator") == "Exists":
        return not toleration.get("key") or toleration["key"] == taint.get("key")
    return toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get("value", "")


def _node_reasons(node: dict, pod_spec: dict) -> list[str]:
    if taint := _untolerated(node, pod_spec):
        return [f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"]
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(k) != v for k, v in (pod_spec.get("nodeSelector") or {}).items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    wanted: dict[str, float] = {}
    for container in pod_spec.get("containers") or []:
        for resource, amount in ((container.get("resources") or {}).get("requests") or {}).items():
            wanted[resource] = wanted.get(resource, 0) + quantity(amount)
    return [f"Insufficient {resource}" for resource, amount in sorted(wanted.items())
            if resource in allocatable and amount > quantity(allocatable[resource])]


def unschedulable_message(pod: dict, nodes: list[dict]) -> str | None:
    """The scheduler's FailedScheduling message when no node fits the Pod, else None."""
    spec = pod.get("spec") or {}
    counts: dict[str, int] = {}
    for node in nodes:
        reasons = _node_reasons(node, spec)
        if not reasons:
            return None
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    total = len(nodes)
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
    return (f"0/{total} nodes are available: {reasons}. preemption: 0/{total} nodes are available: "
            f"{total} Preemption is not helpful for scheduling.")


def mount_failures(pod: dict, get_secret: GetSecret) -> list[str]:
    """FailedMount messages for the Pod's Secret volumes that cannot be set up."""
    failures = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        source = volume.get("secret")
        if source is None or source.get("optional"):
            continue
        secret = get_secret(source.get("secretName", ""))
        if secret is None:
            why = f'secret "{source.get("secretName", "")}" not found'
        else:
            missing = [i["key"] for i in source.get("items") or [] if i["key"] not in (secret.get("data") or {})]
            if not missing:
                continue
            why = f"references non-existent secret key: {missing[0]}"
        failures.append(f'MountVolume.SetUp failed for volume "{volume["name"]}" : {why}')
    return failures


def normalised_image(image: str) -> str:
    """The reference containerd resolves: `docker.io/library/` for short Docker Hub names, `:latest` if untagged."""
    first, _, rest = image.partition("/")
    if not rest:
        image = f"docker.io/library/{image}"
    elif "." not in first and ":" not in first and first != "localhost":
        image = f"docker.io/{image}"
    name = image.split("@", 1)[0]
    if "@" not in image and ":" not in name.rsplit("/", 1)[-1]:
        image += ":latest"
    return image


def pull_error(image: str) -> str:
    ref = normalised_image(image)
    return (f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
            f'failed to resolve reference "{ref}": {ref}: not found')


def env_secret_error(pod: dict, container: dict, get_secret: GetSecret) -> str | None:
    """The CreateContainerConfigError message of a container whose env names a missing Secret or key."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    for env in container.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
        if not ref or ref.get("optional"):
            continue
        secret = get_secret(ref.get("name", ""))
        if secret is None:
            return f'secret "{ref.get("name", "")}" not found'
        if ref.get("key") not in (secret.get("data") or {}):
            return f"couldn't find key {ref.get('key')} in Secret {namespace}/{ref.get('name')}"
    return None


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """third_party/forked/golang/expansion/expand.go `Expand` with `MappingFuncFor`: `lookup` answers None for an
    undefined name, which then stays `$(NAME)`."""
    out, checkpoint, cursor = [], 0, 0
    while cursor < len(text):
        if text[cursor] == OPERATOR and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1:]
            if rest[0] == OPERATOR:  # escaped operator
                read, advance = OPERATOR, 1
            elif rest[0] == OPENER and (end := rest.find(CLOSER, 1)) != -1:
                name = rest[1:end]
                value = lookup(name)
                read, advance = (f"{OPERATOR}{OPENER}{name}{CLOSER}" if value is None else value), end + 1
            elif rest[0] == OPENER:  # incomplete reference: keep `$(` and go on after it
                read, advance = OPERATOR + OPENER, 1
            else:  # an operator that begins no expression keeps the character after it
                read, advance = OPERATOR + rest[0], 1
            out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


class EnvError(LookupError):
    """A `secretKeyRef` the kubelet cannot resolve; the container would wait with CreateContainerConfigError."""


def container_env(pod: dict, container: dict, get_secret: GetSecret) -> dict[str, str]:
    """The container's environment as makeEnvironmentVariables builds it (no envFrom, no service links, no
    fieldRef or resourceFieldRef: the sandbox's pods use none, and one would raise EnvError)."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        value = var.get("value") or ""
        source = var.get("valueFrom")
        if value:
            value = expand(value, env.get)
        elif source:
            ref = source.get("secretKeyRef")
            if ref is None:
                raise EnvError(f"the sandbox kubelet resolves only secretKeyRef, not {sorted(source)}")
            secret = get_secret(ref.get("name", ""))
            data = (secret or {}).get("data") or {}
            if ref.get("key") not in data:
                if ref.get("optional"):
                    continue
                raise EnvError(env_secret_error(pod, {"env": [var]}, get_secret) or "secret not found")
            value = base64.b64decode(data[ref["key"]]).decode()
        env[var["name"]] = value
    return env


def expand_command_and_args(container: dict, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """pkg/kubelet/container/helpers.go ExpandContainerCommandAndArgs."""
    return ([expand(item, env.get) for item in container.get("command") or []],
            [expand(item, env.get) for item in container.get("args") or []])
