"""Pod Security admission as the API server enforces it on Pod create: the namespace's
`pod-security.kubernetes.io/enforce` label picks the level (absent = privileged), and a Pod
that breaks a check of that level is refused with 403 Forbidden.

Checks and texts follow kubernetes/pod-security-admission policy/check_*.go (master, 2026-07,
the checks of v1.35): the checks run in the order their files register (alphabetical), and
the message is admission/admission.go's `violates PodSecurity %q: %s` with
policy/checks.go's `reason (detail), reason (detail)`, wrapped by admission/response.go in
apierrors.NewForbidden: `pods "<name>" is forbidden: ...`. Only the checks our pods can touch
are modelled; a field none of them covers passes.
"""

from __future__ import annotations

from collections.abc import Callable

from . import errors

LEVEL_LABEL = "pod-security.kubernetes.io/enforce"
LEVELS = ("privileged", "baseline", "restricted")
# policy/check_capabilities_baseline.go capabilities_allowed_1_0
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
ALLOWED_VOLUMES = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                   "projected", "secret")  # policy/check_restrictedVolumes.go

Result = tuple[str, str] | None  # (forbidden reason, detail)


def _containers(spec: dict) -> list[dict]:
    """visitContainers: init containers, containers, ephemeral containers."""
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or []),
            *(spec.get("ephemeralContainers") or [])]


def _sc(container: dict) -> dict:
    return container.get("securityContext") or {}


def _quote(items) -> str:
    return '"' + '", "'.join(items) + '"' if items else ""


def _plural(singular: str, plural: str, count: int) -> str:
    return singular if count == 1 else plural


def _named(kind: str, names: list[str]) -> str:
    return f"{_plural(kind, kind + 's', len(names))} {_quote(names)}"


def allow_privilege_escalation(spec: dict) -> Result:
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("allowPrivilegeEscalation") is not False]
    if bad:
        return "allowPrivilegeEscalation != false", f"{_named('container', bad)} must set " \
                                                    "securityContext.allowPrivilegeEscalation=false"
    return None


def app_armor_profile(spec: dict) -> Result:
    setters, values = [], set()
    pod_type = ((spec.get("securityContext") or {}).get("appArmorProfile") or {}).get("type")
    if pod_type and pod_type not in ("RuntimeDefault", "Localhost"):
        setters.append("pod")
        values.add(pod_type)
    bad = []
    for c in _containers(spec):
        kind = (_sc(c).get("appArmorProfile") or {}).get("type")
        if kind and kind not in ("RuntimeDefault", "Localhost"):
            bad.append(c["name"])
            values.add(kind)
    if bad:
        setters.append(_named("container", bad))
    if setters:
        return (_plural("forbidden AppArmor profile", "forbidden AppArmor profiles", len(values)),
                f"{' and '.join(setters)} must not set AppArmor profile type to {_quote(sorted(values))}")
    return None


def capabilities_baseline(spec: dict) -> Result:
    bad, added = [], set()
    for c in _containers(spec):
        extra = [cap for cap in ((_sc(c).get("capabilities") or {}).get("add") or []) if cap not in BASELINE_CAPABILITIES]
        if extra:
            bad.append(c["name"])
            added.update(extra)
    if bad:
        return "non-default capabilities", f"{_named('container', bad)} must not include {_quote(sorted(added))} " \
                                           "in securityContext.capabilities.add"
    return None


def capabilities_restricted(spec: dict) -> Result:
    missing_drop, adding, added = [], [], set()
    for c in _containers(spec):
        caps = _sc(c).get("capabilities")
        if caps is None:
            missing_drop.append(c["name"])
            continue
        if "ALL" not in (caps.get("drop") or []):
            missing_drop.append(c["name"])
        extra = [cap for cap in caps.get("add") or [] if cap != "NET_BIND_SERVICE"]
        if extra:
            adding.append(c["name"])
            added.update(extra)
    details = []
    if missing_drop:
        details.append(f'{_named("container", missing_drop)} must set securityContext.capabilities.drop=["ALL"]')
    if adding:
        details.append(f"{_named('container', adding)} must not include {_quote(sorted(added))} in "
                       "securityContext.capabilities.add")
    return ("unrestricted capabilities", "; ".join(details)) if details else None


def host_path_volumes(spec: dict) -> Result:
    names = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    return ("hostPath volumes", _named("volume", names)) if names else None


def privileged(spec: dict) -> Result:
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("privileged") is True]
    return ("privileged", f"{_named('container', bad)} must not set securityContext.privileged=true") if bad else None


def restricted_volumes(spec: dict) -> Result:
    bad, kinds = [], set()
    for volume in spec.get("volumes") or []:
        if any(kind in volume for kind in ALLOWED_VOLUMES):
            continue
        bad.append(volume["name"])
        kinds.add(next((k for k in volume if k != "name"), "unknown"))
    if bad:
        return "restricted volume types", (
            f"{_named('volume', bad)} {_plural('uses', 'use', len(bad))} "
            f"{_plural('restricted volume type', 'restricted volume types', len(kinds))} {_quote(sorted(kinds))}")
    return None


def run_as_non_root(spec: dict) -> Result:
    if spec.get("hostUsers") is False:  # runAsNonRoot1_35: relaxed for user-namespaced pods
        return None
    setters = []
    pod_value = (spec.get("securityContext") or {}).get("runAsNonRoot")
    if pod_value is False:
        setters.append("pod")
    explicit, implicit = [], []
    for c in _containers(spec):
        value = _sc(c).get("runAsNonRoot")
        if value is False:
            explicit.append(c["name"])
        elif value is None and pod_value is not True:
            implicit.append(c["name"])
    if explicit:
        setters.append(_named("container", explicit))
    if setters:
        return "runAsNonRoot != true", f"{' and '.join(setters)} must not set securityContext.runAsNonRoot=false"
    if implicit:
        return "runAsNonRoot != true", f"pod or {_named('container', implicit)} must set " \
                                       "securityContext.runAsNonRoot=true"
    return None


def _seccomp(spec: dict, restricted: bool) -> Result:
    setters, values = [], set()
    pod_type = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    pod_ok = pod_type in ("RuntimeDefault", "Localhost")
    if pod_type and not pod_ok:
        setters.append("pod")
        values.add(pod_type)
    explicit, implicit = [], []
    for c in _containers(spec):
        kind = (_sc(c).get("seccompProfile") or {}).get("type")
        if kind and kind not in ("RuntimeDefault", "Localhost"):
            explicit.append(c["name"])
            values.add(kind)
        elif not kind and not pod_ok:
            implicit.append(c["name"])
    if explicit:
        setters.append(_named("container", explicit))
    if setters:
        return "seccompProfile", f"{' and '.join(setters)} must not set securityContext.seccompProfile.type to " \
                                 f"{_quote(sorted(values))}"
    if restricted and implicit:
        return "seccompProfile", f'pod or {_named("container", implicit)} must set ' \
                                 'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"'
    return None


def seccomp_baseline(spec: dict) -> Result:
    return _seccomp(spec, restricted=False)


def seccomp_restricted(spec: dict) -> Result:
    return _seccomp(spec, restricted=True)


Check = Callable[[dict], Result]
BASELINE: list[Check] = [app_armor_profile, capabilities_baseline, host_path_volumes, privileged, seccomp_baseline]
# restricted: the baseline checks it does not override, and its own (capabilities_restricted
# and seccompProfile_restricted override their baseline checks; restrictedVolumes overrides hostPath).
RESTRICTED: list[Check] = [allow_privilege_escalation, app_armor_profile, capabilities_restricted, privileged,
                           restricted_volumes, run_as_non_root, seccomp_restricted]


def violation(level: str, spec: dict) -> str | None:
    """`privileged (container "x" must ...), seccompProfile (...)`, or None when the pod passes `level`."""
    checks = {"privileged": [], "baseline": BASELINE, "restricted": RESTRICTED}[level]
    found = [result for check in checks if (result := check(spec))]
    return ", ".join(f"{reason} ({detail})" if detail else reason for reason, detail in found) or None


def admit_pod(namespace_obj: dict | None, pod: dict) -> None:
    """Raise 403 Forbidden as the API server does when the namespace's enforce level refuses the Pod."""
    labels = ((namespace_obj or {}).get("metadata") or {}).get("labels") or {}
    level = labels.get(LEVEL_LABEL, "privileged")
    if level not in LEVELS:
        return
    version = labels.get(f"{LEVEL_LABEL}-version", "latest")
    detail = violation(level, (pod.get("spec") or {}))
    if detail:
        name = (pod.get("metadata") or {}).get("name", "")
        raise errors.ApiError(403, f'pods "{name}" is forbidden: violates PodSecurity "{level}:{version}": {detail}',
                              "Forbidden", {"name": name, "kind": "pods"})
