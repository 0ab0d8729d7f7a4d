"""Build stage, a pod that does not start: decide from the Job's pods and events whether to wait or give up.

A Job only fails when a pod fails, and a pod that can never start does not fail: it waits
(ErrImagePull/ImagePullBackOff, CreateContainerConfigError, ContainerCreating on a missing Secret
volume, PodScheduled=False), or is never created (Pod Security admission, a quota: FailedCreate
events on the Job). Left alone the run would hold until activeDeadlineSeconds. The policy:

- definite now: the image does not exist (containerd's NotFound, `manifest unknown`, an invalid
  name, `pull access denied`), Pod Security refused the pod, a Secret or a key of it is missing;
- possibly transient, given `build.pending_timeout_seconds`: a pull that failed otherwise (429 rate
  limits, timeouts), any other FailedCreate (a quota may free up), no node fits and nothing provisions one;
- waiting within the build deadline: no node fits yet but one is being provisioned, which the pod's
  events show: Karpenter / EKS Auto Mode `Nominated` (kubernetes-sigs/karpenter
  pkg/controllers/provisioning/scheduling/events.go, `Pod should schedule on: nodeclaim/...`) or the
  Cluster Autoscaler's `TriggeredScaleUp` (kubernetes/autoscaler cluster-autoscaler
  processors/status/eventing_scale_up_processor.go, `pod triggered scale-up: ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROVISIONING_REASONS = ("Nominated", "TriggeredScaleUp")
PULL_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
DEFINITE_PULL = re.compile(r"code = NotFound|: not found\b|manifest unknown|MANIFEST_UNKNOWN|pull access denied|"
                           r"repository does not exist|invalid reference format|InvalidImageName|couldn't parse image")
TRANSIENT_PULL = re.compile(r"(?i)\b429\b|toomanyrequests|rate limit|timeout|timed out|connection refused|"
                            r"unavailable|\b50[234]\b")


@dataclass(frozen=True)
class Verdict:
    """`fail` with the reason, or `recheck_in` seconds (None: only a new pod or event can change it)."""

    fail: str | None = None
    recheck_in: float | None = None


def started(pod: dict) -> bool:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False


def live(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def events_about(events: list[dict], kind: str, name: str) -> list[dict]:
    return [e for e in events if (e.get("involvedObject") or {}).get("kind") == kind
            and (e.get("involvedObject") or {}).get("name") == name]


def _after_timeout(why: str, waited: float, timeout: float) -> Verdict:
    if waited >= timeout:
        return Verdict(fail=f"{why} for {int(waited)} s (build.pending_timeout_seconds is {timeout:g})")
    return Verdict(recheck_in=timeout - waited)


def pod_verdict(pod: dict, events: list[dict], *, waited: float, timeout: float) -> Verdict:
    """Whether to give up on one pod that has not started, `waited` seconds after it was first seen."""
    if started(pod):
        return Verdict()
    own = events_about(events, "Pod", pod["metadata"]["name"])
    waiting = [(s.get("state") or {}).get("waiting") or {}
               for s in (pod.get("status") or {}).get("containerStatuses") or []]
    if any(w.get("reason") == "CreateContainerConfigError" for w in waiting):
        return Verdict(fail="a Secret the build container needs is missing")
    if any(e.get("reason") == "FailedMount" and re.search(r"not found|non-existent secret key", e.get("message", ""))
           for e in own):
        return Verdict(fail="a Secret volume of the build pod is missing")
    pulls = [w.get("message", "") for w in waiting if w.get("reason") in PULL_WAITING]
    pulls += [e.get("message", "") for e in own if e.get("message", "").startswith("Failed to pull image")]
    if any(w.get("reason") in PULL_WAITING for w in waiting) or pulls:
        definite = [m for m in pulls if DEFINITE_PULL.search(m) and not TRANSIENT_PULL.search(m)]
        if definite or any(w.get("reason") in ("InvalidImageName", "ErrImageNeverPull") for w in waiting):
            return Verdict(fail="the build image cannot be pulled")
        return _after_timeout("the build image could not be pulled", waited, timeout)
    if any(e.get("reason") in PROVISIONING_REASONS for e in own):
        return Verdict()
    unschedulable = any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                        and c.get("reason") == "Unschedulable" for c in (pod.get("status") or {}).get("conditions") or [])
    if unschedulable:
        return _after_timeout("no node can run the build pod and none is being provisioned", waited, timeout)
    return _after_timeout("the build pod has not started", waited, timeout)


def job_verdict(job_name: str, pods: list[dict], events: list[dict], *, waited: float, timeout: float,
                pod_waited: dict[str, float]) -> Verdict:
    """The verdict on a Job whose pods have not (all) started: about its newest live pod, or about its
    FailedCreate events when it has none."""
    current = [p for p in pods if live(p)]
    if current:
        pod = current[-1]
        return pod_verdict(pod, events, waited=pod_waited.get(pod["metadata"]["name"], 0.0), timeout=timeout)
    failed_create = [e for e in events_about(events, "Job", job_name) if e.get("reason") == "FailedCreate"]
    if any("violates PodSecurity" in e.get("message", "") for e in failed_create):
        return Verdict(fail="Pod Security admission refuses the build pod")
    if failed_create:
        return _after_timeout("Kubernetes would not create the build pod", waited, timeout)
    return Verdict()
