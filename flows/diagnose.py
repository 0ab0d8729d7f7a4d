"""Known ways a build Job (BuildKit or Kaniko) fails, recognised from its log and its Pod/Job status, with the fix to make.

`SIGNATURES` is the table: each entry has regular expressions searched in the
build log and/or in one line per Pod condition, container state, Job condition
and event (see `status_lines`). The log is rendered first: rawjson to buildctl's
plain form (so errors inside vertex JSON and base64 logs are visible), then
logrus text lines (Kaniko's, buildkitd's) to `LEVEL msg` with the msg unquoted
(`flows/kaniko_log.py`). The first entry that matches wins, so the table is
ordered most specific first: the Pod never starting, then the pod being killed,
then buildkitd failing to run at all, then the build's own errors, and a
failing RUN step last.

An entry is a kind of failure, whichever builder shows it: Kaniko's texts are
patterns of the same entries as BuildKit's. Kaniko only warns when it cannot
push a layer to its cache (`WARNING Error uploading layer to cache: ...`) and
the build goes on, so the registry entries skip `WARNING` lines.

Summaries and actions are `str.format` templates over the named groups of the
pattern that matched, plus `namespace`, plus the builder's words in `BUILDERS`
(the builder is Kaniko when the status names the `kaniko` container or the log
has Kaniko's own lines), plus the entry's `defaults`.

Where the sample texts come from is noted per entry and in each test fixture's
header (tests/fixtures/buildkit/, tests/fixtures/kaniko/).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from flows.build import describe_failure
from flows.config import DEFAULT_KANIKO_IMAGE
from flows.kaniko_log import is_kaniko_log, kaniko_plain
from flows.progress import to_plain
from flows.secrecy import withhold_presigned_query

NO_MATCH = "no known signature"
NOT_A_WARNING = r"^(?!WARNING )[^\n]*?"
KANIKO_STATUS = re.compile(r'\bcontainer "?kaniko\b|kaniko-project/executor|osscontainertools/kaniko')

BUILDERS: dict[str, dict[str, str]] = {
    "buildkit": {
        "builder": "BuildKit",
        "image_setting": "build.image",
        "image_example": "moby/buildkit:v0.x.y (or v0.x.y-rootless)",
        "psa_level": "privileged",
        "psa_note": " (or use build.mode: rootless on nodes with user namespaces, which needs at least `baseline` "
                    "relaxed for seccomp/AppArmor Unconfined)",
        "storage": "an emptyDir for /var/lib/buildkit with a larger sizeLimit",
        "dockerfile_flag": "--opt filename",
    },
    "kaniko": {
        "builder": "Kaniko",
        "image_setting": "build.kaniko_image",
        "image_example": DEFAULT_KANIKO_IMAGE,
        "psa_level": "baseline",
        "psa_note": " (Kaniko needs no privileges, but it runs as root with the runtime's default capabilities, "
                    "which `restricted` refuses)",
        "storage": "Kaniko unpacks the image into its container's own filesystem: "
                   "set ephemeral-storage in build.resources requests and limits",
        "dockerfile_flag": "--dockerfile",
    },
}


class Diagnosis(BaseModel):
    name: str
    summary: str
    action: str
    evidence: str = ""


@dataclass(frozen=True)
class Signature:
    """One known failure: patterns for the plain log and for `status_lines`, and what to tell the user.

    `refine` adds template values computed from the match and the whole plain log.
    """

    name: str
    summary: str
    action: str
    log: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)
    refine: Callable[[re.Match, str], dict[str, str]] | None = None

    def search(self, log: str, status: str) -> re.Match | None:
        candidates = [(p, status) for p in self.status] + [(p, log) for p in self.log]
        for pattern, text in candidates:
            if text and (found := re.search(pattern, text, re.MULTILINE)):
                return found
        return None


def _run_step(found: re.Match, log: str) -> dict[str, str]:
    """Name the failed step as the plain progress did (`[3/5] RUN ...`), and read its exit code.

    Kaniko's error names no command, but it logs each command before running
    it, so the step is the last `INFO RUN ...` line before the error. A RUN
    killed by a signal (`signal: killed`, the OOM killer) counts as exit 137.
    """
    groups = found.groupdict()
    if command := groups.get("command"):
        step = "RUN " + re.sub(r"^/bin/(?:ba)?sh -c ", "", command)
    else:
        runs = re.findall(r"^INFO ((?i:RUN)\s[^\n]*)$", log[: found.start()], re.MULTILINE)
        step = runs[-1] if runs else "RUN"
    if vertex := groups.get("vertex"):
        if header := re.search(rf"^#{vertex} (\[[^\]\n]*\] RUN [^\n]*)$", log, re.MULTILINE):
            step = header.group(1)
    code = groups.get("code") or "137"
    hints = {
        "137": " It was killed (exit 137), which usually means it ran out of memory: raise build.resources.limits.memory.",
        "127": " Exit 127 means a command was not found in the image.",
    }
    return {"step": step, "code": code, "hint": hints.get(code, "")}


_CONTEXT_ADVICE = (
    (r"\b40[34]\b",
     "the presigned context URL was rejected (403 usually means it expired before the pod started, "
     "404 that the object is gone): raise aws.presign_ttl_seconds above the time builds wait to "
     "be scheduled, and rerun so a fresh URL is made"),
    (r"(?i:dial tcp|no such host|i/o timeout|connection (?:refused|reset)|TLS handshake|x509:)",
     "the build pod could not reach the bucket: allow its egress to S3 on 443 (NetworkPolicy, proxy, DNS) "
     "in the build namespace"),
    (r"/kaniko/buildcontext/\S*: no such file or directory",
     "the downloaded archive lacks the context directory Kaniko was told to use (--context-sub-path): "
     "check the packaged archive (`buildkit-pipeline plan --json --list-files` lists it)"),
)


def _context_advice(found: re.Match, log: str) -> dict[str, str]:
    """What to do depends on how the download failed: an expired URL, no route to S3, or a wrong archive."""
    detail = found.group("detail")
    for pattern, advice in _CONTEXT_ADVICE:
        if re.search(pattern, detail):
            return {"advice": advice}
    return {"advice": "check that the presigned context URL is still valid (aws.presign_ttl_seconds) and that "
                      "the build pod can reach the bucket, then rerun so a fresh URL is made"}


def _registry_host(found: re.Match, log: str) -> dict[str, str]:
    host = re.search(r"(?:failed to push |https://)([a-z0-9.-]+\.[a-z]{2,}(?::\d+)?)", _line_of(found))
    return {"registry": f"the registry {host.group(1)}"} if host else {}


# Kubernetes samples: the Pod Security admission message of pod-security-admission's
# baseline "privileged" check as quoted in rancher/k3k#294; `0/3 nodes are available`
# scheduler messages as in kubectl describe output (rancher, csi docs); kubelet's
# `Back-off pulling image "..."` and containerd's `failed to pull and unpack image` texts
# from kubectl describe outputs; Job `DeadlineExceeded` / `Job was active longer than
# specified deadline` from the Job controller.
SIGNATURES: list[Signature] = [
    Signature(
        name="pod-security-admission",
        summary="Pod Security admission ({level}) refused the build pod in namespace {namespace}: {detail}",
        action="the build namespace needs Pod Security `{psa_level}`: "
               "kubectl label ns {namespace} pod-security.kubernetes.io/enforce={psa_level} --overwrite{psa_note}",
        status=(r"^(?:event|job condition) .*?violates PodSecurity \"(?P<level>[^\"]+)\": (?P<detail>[^(\n]*\([^)\n]*\))",),
    ),
    Signature(
        name="pod-create-failed",
        summary="Kubernetes would not create the build pod: {detail}",
        action="fix what the message names in namespace {namespace}: usually a ResourceQuota or LimitRange "
               "the build's resources do not fit, or an admission webhook's policy",
        status=(r"^event \S+ FailedCreate \S+: (?P<detail>.*)$",),
    ),
    Signature(
        name="unschedulable",
        summary="no node can run the build pod: {detail}",
        action="lower build.resources requests, or add nodes that fit them (check the build's nodeSelector, "
               "tolerations and the cluster autoscaler)",
        status=(
            r"^pod condition PodScheduled=False reason=Unschedulable message=(?P<detail>.*)$",
            r"^event \S+ FailedScheduling \S+: (?P<detail>\d+/\d+ nodes are available.*)$",
        ),
    ),
    Signature(
        name="buildkit-image-pull",
        summary="the node cannot pull the {builder} image {image} ({reason}): {detail}",
        action="set {image_setting} to an existing, pinned tag such as {image_example}, "
               "and check the nodes can reach that registry (imagePullSecrets for a private mirror)",
        status=(
            r"^event \S+ Failed \S+: Failed to pull image \"(?P<image>[^\"]+)\": (?P<detail>.*)$",
            r"^pod container \S+ state\.waiting image=(?P<image>\S*) "
            r"reason=(?P<reason>ImagePullBackOff|ErrImagePull|InvalidImageName) exitCode=\S* message=(?P<detail>.*)$",
        ),
        defaults={"reason": "ErrImagePull", "detail": "see the pod's events"},
    ),
    # kubernetes/kubernetes pkg/kubelet/kubelet_pods.go makeEnvironmentVariables (`secret "x" not found`
    # from the secret manager, `couldn't find key k in Secret ns/x`) and pkg/volume/secret/secret.go
    # (`MountVolume.SetUp failed for volume "v" : secret "x" not found`, `references non-existent secret key: k`).
    Signature(
        name="secret-missing",
        summary="the build pod cannot start: {detail}",
        action="the build's Secrets are created by the run just before its Job and owned by it: check nothing "
               "in namespace {namespace} deletes them (a cleanup job, a policy), then rerun",
        status=(
            r"^pod container \S+ state\.waiting image=\S* reason=CreateContainerConfigError exitCode=\S* "
            r"message=(?P<detail>.*)$",
            r"^event \S+ FailedMount \S+: (?P<detail>MountVolume\.SetUp failed for volume .*)$",
        ),
    ),
    Signature(
        name="deadline-exceeded",
        summary="the build Job ran past its deadline and Kubernetes stopped it ({detail})",
        action="raise build.timeout_seconds (the Job's activeDeadlineSeconds), or make the build faster: "
               "check the registry cache is imported (cache hits in the step table) and the node is not starved",
        status=(r"^job condition (?:Failed|FailureTarget)=True reason=DeadlineExceeded message=(?P<detail>.*)$",),
    ),
    Signature(
        name="oom-killed",
        summary="the {builder} container was killed at its memory limit ({reason}, exit code 137)",
        action="raise build.resources.limits.memory for this component, or make the heavy RUN step use less "
               "memory (fewer parallel jobs, e.g. MAKEFLAGS=-j2, NODE_OPTIONS=--max-old-space-size)",
        status=(
            r"^pod container \S+ (?:state|lastState)\.terminated image=\S* reason=(?P<reason>OOMKilled) ",
            r"^pod container \S+ (?:state|lastState)\.terminated image=\S* reason=(?P<reason>\S*) exitCode=137 ",
        ),
        defaults={"reason": "SIGKILL"},
    ),
    # buildkit docs/rootless.md, "Troubleshooting": `fork/exec /proc/self/exe: no space left on
    # device` with `/proc/sys/user/max_user_namespaces needs to be set to non-zero.`;
    # `invalid argument` variant from moby/buildkit#1638 and #1188.
    Signature(
        name="rootless-userns",
        summary="rootless BuildKit could not create a user namespace on this node ({detail})",
        action="set build.mode: privileged, or run rootless builds on nodes with user namespaces "
               "(sysctl -w user.max_user_namespaces=63359 on the hosts)",
        log=(
            r"(?P<detail>fork/exec /proc/self/exe: (?:no space left on device|invalid argument))",
            r"(?P<detail>/proc/sys/user/max_user_namespaces needs to be set to non-zero)",
        ),
    ),
    # rootless-containers/rootlesskit#68 and #172 (`operation not permitted` / `permission
    # denied`); buildkit docs/rootless.md for apparmor_restrict_unprivileged_userns.
    Signature(
        name="rootless-confined",
        summary="rootlesskit was not allowed to start BuildKit ({detail})",
        action="rootless BuildKit needs seccompProfile Unconfined and AppArmor unconfined on the build container "
               "(and kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04+ nodes); "
               "or set build.mode: privileged",
        log=(
            r"\[rootlesskit:parent\] error: failed to start the child: "
            r"(?P<detail>fork/exec /proc/self/exe: (?:operation not permitted|permission denied))",
            r"(?P<detail>apparmor_restrict_unprivileged_userns is set to 1)",
        ),
    ),
    # moby/buildkit#1427, #3356 and concourse/oci-build-task#11 (`failed to read dockerfile:
    # failed to mount /tmp/buildkit-mountN: ...: operation not permitted`); moby/buildkit#4073
    # and docs/rootless.md (`mount proc:/proc (via /proc/self/fd/6), flags: 0xe`);
    # opencontainers/runc#3602 (`mounting "proc" to rootfs at "/proc" ...`).
    Signature(
        name="buildkitd-not-privileged",
        summary="buildkitd is not allowed to mount filesystems in this container ({detail})",
        action="build.mode: privileged needs securityContext.privileged: true on the buildkit container "
               "(check nothing strips it); in rootless mode set BUILDKITD_FLAGS=--oci-worker-no-process-sandbox",
        log=(
            r"(?P<detail>mount proc:/proc \(via /proc/self/fd/\d+\), flags: 0x[0-9a-f]+: operation not permitted)",
            r"(?P<detail>mounting \"proc\" to rootfs at \"/proc\"[^\n]*operation not permitted)",
            r"(?P<detail>failed to mount /tmp/buildkit-mount\d+: [^\n]*operation not permitted)",
        ),
    ),
    # moby/buildkit#2697: `copy file range failed: no space left on device`.
    Signature(
        name="disk-full",
        summary="the build ran out of disk space ({detail})",
        action="give the build pod more ephemeral storage ({storage}) or nodes with bigger disks, "
               "or shrink the context and image layers",
        log=(r"(?P<detail>[^:\n\"]+: no space left on device)",),
    ),
    # buildctl-daemonless.sh (moby/buildkit examples): `could not connect to $addr after $max
    # trials`, then buildkitd's log; moby/buildkit#1638, #3292.
    Signature(
        name="buildkitd-did-not-start",
        summary="buildkitd did not start: {detail}",
        action="read buildkitd's log printed after this line in the build log; check build.image and "
               "build.mode match (the -rootless image runs as uid 1000 and needs the rootless settings)",
        log=(r"(?P<detail>could not connect to \S+ after \d+ trials)",),
    ),
    # frontend/dockerui (moby/buildkit): the context URL is solved as the vertex
    # "[internal] load remote build context", wrapped as `failed to resolve httpcontext`;
    # source/http/source.go: `invalid response status %d`. Kaniko: cobra prints the
    # PersistentPreRunE error `Error: error resolving source context: ...` (cmd/executor/cmd/root.go)
    # around pkg/buildcontext/https.go's `HTTPSTar bad status from server: %s` or the http.Get error.
    Signature(
        name="context-download",
        summary="{builder} could not download the build context: {detail}",
        action="{advice}",
        log=(
            r"^#(?P<n>\d+) \[internal\] load remote build context$[\s\S]*?^#(?P=n) ERROR: (?P<detail>[^\n]*)$",
            r"failed to resolve httpcontext: (?P<detail>[^\n]*)",
            r"^Error: error resolving source context: (?P<detail>[^\n]*)",
        ),
        refine=_context_advice,
    ),
    # Many reports quoted in docker/for-win#8781, docker/getting-started#313, setube/stb#8:
    # `failed to solve: failed to read dockerfile: open Dockerfile: no such file or directory`.
    # Kaniko: cmd/executor/cmd/root.go resolveDockerfilePath, printed by cobra (kaniko#1457, #3031).
    Signature(
        name="dockerfile-missing",
        summary="{builder} found no Dockerfile at {path} in the build context",
        action="check the component's dockerfile path in the pipeline file; the packaged archive must hold it "
               "at the path passed as {dockerfile_flag} (`buildkit-pipeline plan --json --list-files` lists the archive)",
        log=(
            r"failed to read dockerfile: open (?P<path>[^\n]+?): no such file or directory",
            r"please provide a valid path to a Dockerfile within the build context",
        ),
        defaults={"path": "the --dockerfile path"},
    ),
    # moby/buildkit#4456 (load metadata vertex failing with 401), skjerns/3dprintedbrain_docker#5,
    # zhaarey/wrapper#33, infiniflow/ragflow#4830 (`failed to resolve source metadata for
    # docker.io/...: pull access denied, repository does not exist or may require authorization`).
    Signature(
        name="base-image",
        summary="the base image {image} could not be pulled: {detail}",
        action="check the FROM line: does {image} exist with that tag? A private base image needs credentials "
               "for its registry in the build's docker config; Docker Hub also rate-limits anonymous pulls",
        log=(
            r"failed to resolve source metadata for (?P<image>\S+?): (?P<detail>[^\n]*)",
            r"^#(?P<n>\d+) \[(?:\S+ )?internal\] load metadata for (?P<image>\S+)$[\s\S]*?"
            r"^#(?P=n) ERROR: (?P<detail>[^\n]*)$",
            r"^#(?P<n>\d+) \[[^\]\n]*\] FROM (?P<image>\S+)$[\s\S]*?^#(?P=n) ERROR: (?P<detail>[^\n]*)$",
            r"^INFO Retrieving image (?P<image>\S+) from (?:mapped )?registry \S+\n(?:(?:WARNING|ERROR) [^\n]*\n)*"
            r"error building image: (?:unable to complete operation after \d+ attempts, last error: )?"
            r"(?P<detail>[^\n]*)",
        ),
    ),
    # aws-actions/amazon-ecr-login#166, actions/starter-workflows#2647, plexsystems/sinker#55:
    # `name unknown: The repository with name 'X' does not exist in the registry with id 'N'`;
    # go-containerregistry (Kaniko) writes the code as sent, `NAME_UNKNOWN: ...`.
    Signature(
        name="repository-missing",
        summary="the registry has no repository {repo}",
        action="create the ECR repository {repo} (aws ecr create-repository --repository-name {repo}) "
               "or fix `image:` for this component in the pipeline file",
        log=(
            NOT_A_WARNING + r"(?i:name[ _]unknown): The repository with name '(?P<repo>[^']+)' does not exist",
            NOT_A_WARNING + r"(?i:name[ _]unknown)",
        ),
        defaults={"repo": "named in `image:`"},
    ),
    # Panfactum/stack#103 (ECR push `401 Unauthorized`), docker/buildx#3335 (`failed to fetch
    # oauth token ... 401 Unauthorized`), ECR's `denied: Your authorization token has expired`
    # and `denied: User: ... is not authorized to perform: ecr:InitiateLayerUpload`,
    # aws-actions/amazon-ecr-login#337 (`no basic auth credentials`). Kaniko: `error checking push
    # permissions -- ...: checking push permission for "...": POST ...: UNAUTHORIZED: ...` (kaniko#1325,
    # #2088, #2222) and go-containerregistry's `DENIED: ...`.
    Signature(
        name="registry-auth",
        summary="{registry} refused the build's registry credentials ({detail})",
        action="check the registry credentials the build gets: the ECR token must be minted for this "
               "account/region by a role allowed ecr:InitiateLayerUpload, ecr:UploadLayerPart, "
               "ecr:CompleteLayerUpload, ecr:PutImage and ecr:BatchCheckLayerAvailability on the repository, "
               "and is valid for 12 hours",
        log=tuple(NOT_A_WARNING + pattern for pattern in (
            r"(?P<detail>no basic auth credentials)",
            r"(?P<detail>\bdenied: [^\n]*)",
            r"(?P<detail>\bunauthorized: [^\n]*)",
            r"(?P<detail>\b(?:UNAUTHORIZED|DENIED): [^\n]*)",
            r"(?P<detail>\b40[13] (?:Unauthorized|Forbidden)\b[^\n]*)",
            r"(?P<detail>failed to authorize[^\n]*|insufficient_scope[^\n]*)",
        )),
        defaults={"registry": "the registry"},
        refine=_registry_host,
    ),
    # moby/buildkit error format `process "/bin/sh -c ..." did not complete successfully: exit
    # code: N` (e.g. runc#3602, many CI logs); before v0.10: `executor failed running [...]:
    # exit code: N`. Kaniko (pkg/commands/run.go, pkg/executor/build.go): `error building image: error
    # building stage: failed to execute command: waiting for process to exit: exit status N` (kaniko#1733).
    Signature(
        name="run-step-failed",
        summary="the Dockerfile step `{step}` failed with exit code {code}",
        action="fix that command in the Dockerfile; its output is in the build log just above the error.{hint}",
        log=(
            r"^#(?P<vertex>\d+) ERROR: process \"(?P<command>[^\n]*?)\" did not complete successfully: "
            r"exit code: (?P<code>\d+)",
            r"process \"(?P<command>[^\n]*?)\" did not complete successfully: exit code: (?P<code>\d+)",
            r"executor failed running \[(?P<command>[^\n]*?)\]: exit code: (?P<code>\d+)",
            r"failed to execute command: waiting for process to exit: (?:exit status (?P<code>\d+)|signal: killed)",
        ),
        refine=_run_step,
    ),
]


def diagnose(
    log: str, *, pod: dict | None = None, job: dict | None = None, events: list[dict] | None = None
) -> Diagnosis | None:
    """The first signature in `SIGNATURES` that the log or the Kubernetes status shows, or None.

    A presigned URL's query never reaches the summary or the evidence, whatever log is given (a saved one too)."""
    plain = withhold_presigned_query(kaniko_plain(to_plain(log or "")))
    status = "\n".join(status_lines(pod=pod, job=job, events=events))
    builder = "kaniko" if KANIKO_STATUS.search(status) or is_kaniko_log(plain) else "buildkit"
    context = {"namespace": _namespace(pod, job, events), **BUILDERS[builder]}
    for signature in SIGNATURES:
        if found := signature.search(plain, status):
            values = {**context, **signature.defaults, **_groups(found)}
            if signature.refine:
                values.update(signature.refine(found, plain))
            return Diagnosis(
                name=signature.name,
                summary=_fill(signature.summary, values),
                action=_fill(signature.action, values),
                evidence=_line_of(found),
            )
    return None


def explain_failure(log: str, job: dict, pods: list[dict], events: list[dict] | None = None) -> str:
    """One sentence for a failed build Job, for the error the flow raises."""
    found = diagnose(log, pod=pods[-1] if pods else None, job=job, events=events)
    if found is None:
        return describe_failure(job, pods)
    return f"{found.summary}. Fix: {found.action} [{found.name}]"


def diagnose_file(path) -> int:
    """`buildkit-pipeline diagnose LOGFILE`: print the signature's name, summary and action; 0 if one matched."""
    found = diagnose(Path(path).read_text(encoding="utf-8", errors="replace"))
    if found is None:
        print(NO_MATCH)
        return 1
    print(found.name)
    print(found.summary)
    print(f"fix: {found.action}")
    if found.evidence:
        print(f"seen: {found.evidence}")
    return 0


def status_lines(*, pod: dict | None = None, job: dict | None = None, events: list[dict] | None = None) -> list[str]:
    """Pod, Job and event facts as one line each, the text the status patterns are written against.

    `job condition Failed=True reason=DeadlineExceeded message=...`
    `pod condition PodScheduled=False reason=Unschedulable message=...`
    `pod container buildkit state.terminated image=... reason=OOMKilled exitCode=137 message=...`
        (the container's own name: `kaniko` for a Kaniko build)
    `event Warning FailedCreate Job/build-x: Error creating: ...`
    """
    lines = [_condition_line("job", c) for c in _list(_status(job).get("conditions"))]
    lines += [_condition_line("pod", c) for c in _list(_status(pod).get("conditions"))]
    for container in _list(_status(pod).get("initContainerStatuses")) + _list(_status(pod).get("containerStatuses")):
        for when in ("state", "lastState"):
            for kind, detail in (container.get(when) or {}).items():
                if isinstance(detail, dict):
                    lines.append(
                        f"pod container {container.get('name', '?')} {when}.{kind} image={container.get('image', '')} "
                        f"reason={detail.get('reason', '')} exitCode={detail.get('exitCode', '')} "
                        f"message={_one_line(detail.get('message', ''))}"
                    )
    for event in _list(events):
        involved = event.get("involvedObject") or {}
        lines.append(
            f"event {event.get('type', '')} {event.get('reason', '')} "
            f"{involved.get('kind', '')}/{involved.get('name', '')}: {_one_line(event.get('message', ''))}"
        )
    return lines


def _condition_line(owner: str, condition: dict) -> str:
    return (
        f"{owner} condition {condition.get('type', '')}={condition.get('status', '')} "
        f"reason={condition.get('reason', '')} message={_one_line(condition.get('message', ''))}"
    )


def _status(obj: dict | None) -> dict:
    return (obj or {}).get("status") or {}


def _list(value) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def _namespace(pod: dict | None, job: dict | None, events: list[dict] | None) -> str:
    for obj in (job, pod):
        if namespace := ((obj or {}).get("metadata") or {}).get("namespace"):
            return namespace
    for event in _list(events):
        if namespace := (event.get("involvedObject") or {}).get("namespace"):
            return namespace
    return "<build namespace>"


def _groups(found: re.Match) -> dict[str, str]:
    return {key: value.strip() for key, value in found.groupdict().items() if value}


class _Blanks(dict):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format_map(_Blanks(values))


def _line_of(found: re.Match) -> str:
    """The log line where the match ends: for multi-line patterns that is the ERROR line."""
    text = found.string
    start = text.rfind("\n", 0, found.end() - 1) + 1
    end = text.find("\n", found.end())
    return text[start:end if end >= 0 else len(text)].strip()


if __name__ == "__main__":
    sys.exit(diagnose_file(sys.argv[1]))
