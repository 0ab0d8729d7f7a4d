"""Small Job, ReplicaSet and Deployment controllers.

They are level-triggered like the real ones: every event about a Job, a Deployment,
a ReplicaSet or a Pod they own puts the owner's key on one work queue, and one
thread reconciles the owner from the current state. Writes that change nothing are
no-ops in the store, so reconciling never loops.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import math
import queue
import threading
import time
from typing import TYPE_CHECKING

from . import defaults, errors, podsecurity
from .pods import controller_owner, is_ready, is_terminal
from .store import StoreEvent

if TYPE_CHECKING:
    from .emulator import KubeEmulator

log = logging.getLogger(__name__)

WorkItem = tuple[str, str, str]  # what to do ("jobs", ..., "pod-created"), namespace, name
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


def _condition(kind: str, reason: str, message: str, status: str = "True") -> dict:
    now = defaults.now_iso()
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


def _owner_reference(owner: dict) -> dict:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _keep_transition_times(old: list[dict], new: list[dict]) -> list[dict]:
    """A condition that did not change status keeps its lastTransitionTime, as upstream does."""
    previous = {c.get("type"): c for c in old}
    for condition in new:
        before = previous.get(condition["type"])
        unchanged = before and before.get("status") == condition["status"] \
            and before.get("reason") == condition.get("reason")
        if unchanged:
            for stamp in ("lastTransitionTime", "lastProbeTime", "lastUpdateTime"):
                if stamp in condition and stamp in before:
                    condition[stamp] = before[stamp]
    return new


def _true_condition(conditions: list[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def match_pod_failure_policy(policy: dict | None, pod: dict) -> tuple[str | None, bool, str | None]:
    """(FailJob message, whether the failure counts against backoffLimit, the action) for a failed pod:
    the first matching rule wins (kubernetes/kubernetes pkg/controller/job/pod_failure_policy.go, v1.33)."""
    if not policy:
        return None, True, None
    status = pod.get("status") or {}
    meta = pod["metadata"]
    for index, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        if (requirement := rule.get("onExitCodes")) is not None:
            matched = _matching_exit(status, requirement)
            if matched is None:
                continue
            message = (f"Container {matched['name']} for pod {meta.get('namespace')}/{meta['name']} failed with exit "
                       f"code {matched['state']['terminated']['exitCode']} matching {action} rule at index {index}")
        elif (patterns := rule.get("onPodConditions")) is not None:
            matched = next((c for c in status.get("conditions") or [] for want in patterns
                            if c.get("type") == want.get("type") and c.get("status") == want.get("status", "True")),
                           None)
            if matched is None:
                continue
            message = (f"Pod {meta.get('namespace')}/{meta['name']} has condition {matched['type']} matching "
                       f"{action} rule at index {index}")
        else:
            continue
        return (message if action == "FailJob" else None), action != "Ignore", action
    return None, True, None


def _matching_exit(status: dict, requirement: dict) -> dict | None:
    for container in (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or []):
        terminated = (container.get("state") or {}).get("terminated")
        if not terminated or terminated.get("exitCode", 0) == 0:
            continue
        if requirement.get("containerName") not in (None, container.get("name")):
            continue
        listed = terminated["exitCode"] in (requirement.get("values") or [])
        if listed == (requirement.get("operator") == "In"):
            return container
    return None


def template_hash(template: dict) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    alphabet = defaults.NAME_SUFFIX_ALPHABET
    return "".join(alphabet[b % len(alphabet)] for b in digest[:10])


def resolve_int_or_percent(value: int | str | None, total: int, round_up: bool) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


class Controllers:
    def __init__(self, emulator: KubeEmulator):
        self.emulator = emulator
        self.store = emulator.store
        self.work: queue.Queue[WorkItem | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="kube-controllers", daemon=True)
        self.timers: list[threading.Timer] = []
        self._finished: dict[str, dict] = {}  # per Job uid: the pods counted (the job-tracking finalizer's role)

    def start(self) -> None:
        self.store.subscribe(self.on_event)
        self.thread.start()

    def stop(self) -> None:
        self.store.unsubscribe(self.on_event)
        for timer in self.timers:
            timer.cancel()
        self.work.put(None)
        self.thread.join(timeout=5)

    def on_event(self, event: StoreEvent) -> None:
        meta = event.obj["metadata"]
        namespace = meta.get("namespace", "")
        if event.plural in ("jobs", "deployments", "replicasets") and event.type != "DELETED":
            self.work.put((event.plural, namespace, meta["name"]))
        if event.plural in ("pods", "replicasets"):
            owner = controller_owner(event.obj)
            if owner and owner.get("kind") in ("Job", "ReplicaSet", "Deployment"):
                plural = {"Job": "jobs", "ReplicaSet": "replicasets", "Deployment": "deployments"}[owner["kind"]]
                self.work.put((plural, namespace, owner["name"]))
        if event.plural == "pods" and event.type == "ADDED":
            self.work.put(("pod-created", namespace, meta["name"]))

    def schedule(self, delay: float, item: WorkItem) -> None:
        timer = threading.Timer(delay, self.work.put, args=(item,))
        timer.daemon = True
        self.timers = [t for t in self.timers if t.is_alive()] + [timer]
        timer.start()

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            plural, namespace, name = item
            try:
                {"jobs": self.reconcile_job, "replicasets": self.reconcile_replicaset,
                 "deployments": self.reconcile_deployment, "pod-created": self.start_pod}[plural](namespace, name)
            except errors.ApiError as exc:
                if exc.code not in (404, 409):
                    log.warning("reconciling %s %s/%s failed: %s", plural, namespace, name, exc.message)
                elif exc.code == 409:
                    self.work.put(item)
            except Exception:
                log.exception("reconciling %s %s/%s crashed", plural, namespace, name)

    def start_pod(self, namespace: str, name: str) -> None:
        """Play the kubelet: hand a new pod to its behaviour (outside the store lock, so
        matchers and behaviours may call back into the emulator)."""
        pod = self.store.find("pods", namespace, name)
        if pod is not None:
            self.emulator._start_pod_behaviour(pod)

    # ---------------------------------------------------------------- shared

    def _owned_pods(self, owner: dict) -> list[dict]:
        pods = self.store.owned_by(owner["metadata"]["uid"], "pods")
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def _create_pod(self, owner: dict, template: dict, extra_labels: dict | None = None) -> dict:
        """Create a pod of `template`; Pod Security admission may refuse it (403)."""
        pod = copy.deepcopy(template)
        meta = pod.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **(extra_labels or {})}
        meta["generateName"] = owner["metadata"]["name"] + "-"
        meta["name"] = meta["generateName"] + defaults.random_suffix()
        meta["ownerReferences"] = [_owner_reference(owner)]
        namespace = owner["metadata"]["namespace"]
        podsecurity.admit_pod(self.store.find("namespaces", None, namespace), pod)
        return self.store.create("pods", namespace, pod)

    def _write_status(self, plural: str, obj: dict, status: dict, *, replace: bool = False) -> dict:
        """Merge `status` into the object's status (or replace it) unless nothing changes."""
        current_status = obj.get("status") or {}
        status["conditions"] = _keep_transition_times(current_status.get("conditions") or [],
                                                      status.get("conditions") or [])
        if not status["conditions"]:
            del status["conditions"]
        merged = status if replace else {**current_status, **status}
        if merged == current_status:
            return obj
        return self.store.update(plural, obj["metadata"].get("namespace"), obj["metadata"]["name"],
                                 {**obj, "status": merged}, subresource="status")

    def _delete_quietly(self, plural: str, obj: dict) -> None:
        try:
            self.store.delete(plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        except errors.ApiError as exc:
            if exc.code != 404:
                raise

    # ---------------------------------------------------------------- Job

    def reconcile_job(self, namespace: str, name: str) -> None:
        """One syncJob of kubernetes/kubernetes pkg/controller/job/job_controller.go (v1.33).

        A decided outcome is written first as the interim condition (FailureTarget, SuccessCriteriaMet),
        active pods are deleted gracefully, and the terminal condition (Failed, Complete) follows only
        once no pod is terminating (enactJobFinished with delayTerminalCondition(), on since 1.31).
        With a podFailurePolicy a failed pod is matched against its rules (pod_failure_policy.go), and
        a replacement is created only once the pod it replaces has stopped (podReplacementPolicy
        Failed, the default with a podFailurePolicy), after the failure back-off (10 s, doubling).
        """
        job = self.store.find("jobs", namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        status = job.get("status") or {}
        conditions = list(status.get("conditions") or [])
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions):
            return
        spec = job.get("spec") or {}
        policy = spec.get("podFailurePolicy")
        pods = self.store.owned_by(job["metadata"]["uid"], "pods")
        terminating = [p for p in pods if p["metadata"].get("deletionTimestamp") and not is_terminal(p)]
        active = [p for p in pods if not p["metadata"].get("deletionTimestamp") and not is_terminal(p)]
        failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        finished = self._finished.setdefault(job["metadata"]["uid"], {"succeeded": set(), "failed": set(), "all": {}})
        for pod in pods:
            phase, uid = (pod.get("status") or {}).get("phase"), pod["metadata"]["uid"]
            if phase == "Succeeded":
                finished["succeeded"].add(uid)
            elif phase == "Failed":
                finished["all"].setdefault(uid, time.monotonic())
                if match_pod_failure_policy(policy, pod)[1]:
                    finished["failed"].add(uid)
        succeeded, failed = len(finished["succeeded"]), len(finished["failed"])
        for pod in pods:  # counted: the job-tracking finalizer goes, and with it a pod being deleted
            if pod["metadata"].get("deletionTimestamp") and is_terminal(pod):
                self._delete_quietly("pods", pod)
        start_time = status.get("startTime") or defaults.now_iso()
        new_status: dict = {"startTime": start_time, "active": len(active), "ready": sum(map(is_ready, active)),
                            "terminating": len(terminating), "uncountedTerminatedPods": {}}
        if succeeded:
            new_status["succeeded"] = succeeded
        if failed:
            new_status["failed"] = failed

        deadline = spec.get("activeDeadlineSeconds")
        decided = _true_condition(conditions, "SuccessCriteriaMet") or _true_condition(conditions, "FailureTarget")
        if decided is None and not spec.get("suspend"):
            if fail_message := next((m for p in failed_pods if (m := match_pod_failure_policy(policy, p)[0])), None):
                decided = _condition("FailureTarget", "PodFailurePolicy", fail_message)
            elif failed > spec.get("backoffLimit", 6):
                decided = _condition("FailureTarget", "BackoffLimitExceeded",
                                     "Job has reached the specified backoff limit")
            elif deadline is not None and self._past(start_time, deadline):
                decided = _condition("FailureTarget", "DeadlineExceeded",
                                     "Job was active longer than specified deadline")
            elif succeeded >= spec.get("completions", 1) and not active:
                decided = _condition("SuccessCriteriaMet", "CompletionsReached",
                                     "Reached expected number of succeeded pods")
            if decided is not None:
                conditions.append(decided)
        if decided is not None:
            for pod in active:
                self.emulator.delete_pod_gracefully(namespace, pod["metadata"]["name"])
            new_status.update(active=0, ready=0, terminating=len(terminating) + len(active))
            if new_status["terminating"] == 0:
                self._finish_job(job, decided, conditions, new_status)
        elif not spec.get("suspend") and not active and not (policy and terminating):
            wait = self._failure_backoff(finished["all"])
            if wait > 0:
                self.schedule(wait, ("jobs", namespace, name))
            elif self._create_job_pod(job):
                new_status.update(active=1)
        if deadline is not None and "startTime" not in status:
            self.schedule(float(deadline) + 0.01, ("jobs", namespace, name))
        new_status["conditions"] = conditions
        self._write_status("jobs", job, new_status)

    def _finish_job(self, job: dict, decided: dict, conditions: list[dict], new_status: dict) -> None:
        final = "Complete" if decided["type"] == "SuccessCriteriaMet" else "Failed"
        conditions.append(_condition(final, decided.get("reason", ""), decided.get("message", "")))
        if final == "Complete":
            new_status["completionTime"] = defaults.now_iso()
            self.emulator.record_event(job, "Normal", "Completed", "Job completed", "job-controller")
        else:
            self.emulator.record_event(job, "Warning", decided.get("reason", ""), decided.get("message", ""),
                                       "job-controller")

    def _failure_backoff(self, failures: dict[str, float]) -> float:
        """Seconds left of the pod failure back-off: 10 s after the last failure, doubling per failure
        (job_controller.go DefaultJobPodFailureBackOff, backoff_utils.go)."""
        if not failures:
            return 0.0
        delay = self.emulator.pod_failure_backoff * 2 ** (len(failures) - 1)
        return max(0.0, max(failures.values()) + delay - time.monotonic())

    def _create_job_pod(self, job: dict) -> bool:
        """Create the Job's pod, with the events the job controller's pod control records
        (pkg/controller/controller_utils.go: SuccessfulCreate `Created pod: x`, FailedCreate `Error creating: ...`)."""
        spec = job.get("spec") or {}
        labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
        try:
            pod = self._create_pod(job, spec.get("template") or {}, labels)
        except errors.ApiError as exc:
            if exc.code not in (403, 422):
                raise
            self.emulator.record_event(job, "Warning", "FailedCreate", f"Error creating: {exc.message}",
                                       "job-controller")
            self.schedule(1.0, ("jobs", job["metadata"]["namespace"], job["metadata"]["name"]))
            return False
        self.emulator.record_event(job, "Normal", "SuccessfulCreate", f"Created pod: {pod['metadata']['name']}",
                                   "job-controller")
        return True

    @staticmethod
    def _past(start_time: str, seconds: float) -> bool:
        started = datetime.datetime.fromisoformat(start_time.replace("Z", "+00:00"))
        return datetime.datetime.now(datetime.UTC) >= started + datetime.timedelta(seconds=seconds)

    # ---------------------------------------------------------------- ReplicaSet

    def reconcile_replicaset(self, namespace: str, name: str) -> None:
        rs = self.store.find("replicasets", namespace, name)
        if rs is None or rs["metadata"].get("deletionTimestamp"):
            return
        desired = (rs.get("spec") or {}).get("replicas", 1)
        pods = [p for p in self._owned_pods(rs) if not is_terminal(p)]
        template = (rs.get("spec") or {}).get("template") or {}
        for _ in range(desired - len(pods)):
            pods.append(self._create_pod(rs, template))
        if len(pods) > desired:
            doomed = sorted(pods, key=is_ready)[:len(pods) - desired]
            for pod in doomed:
                self._delete_quietly("pods", pod)
            pods = [p for p in pods if p not in doomed]
        ready = sum(map(is_ready, pods))
        self._write_status("replicasets", rs, {
            "replicas": len(pods), "fullyLabeledReplicas": len(pods), "readyReplicas": ready,
            "availableReplicas": ready, "observedGeneration": rs["metadata"].get("generation", 1)})

    # ---------------------------------------------------------------- Deployment

    def reconcile_deployment(self, namespace: str, name: str) -> None:
        deployment = self.store.find("deployments", namespace, name)
        if deployment is None or deployment["metadata"].get("deletionTimestamp"):
            return
        spec = deployment.get("spec") or {}
        desired = spec.get("replicas", 1)
        replicasets = self.store.owned_by(deployment["metadata"]["uid"], "replicasets")
        new_rs = self._sync_new_replicaset(deployment, replicasets)
        old_rss = [rs for rs in replicasets if rs["metadata"]["uid"] != new_rs["metadata"]["uid"]]

        new_pods = [p for p in self._owned_pods(new_rs) if not is_terminal(p)]
        new_ready = sum(map(is_ready, new_pods))
        rollout_done = new_ready >= desired and len(new_pods) == desired
        if rollout_done:
            for rs in old_rss:
                if (rs.get("spec") or {}).get("replicas", 0) != 0:
                    self.store.mutate("replicasets", namespace, rs["metadata"]["name"], _scaled_to(0))
        all_pods = new_pods + [p for rs in old_rss for p in self._owned_pods(rs) if not is_terminal(p)]
        ready = sum(map(is_ready, all_pods))
        max_unavailable = resolve_int_or_percent(
            ((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable", "25%"), desired, False)
        available = ready >= desired - max_unavailable
        rs_name = new_rs["metadata"]["name"]
        progressing = (_condition("Progressing", "NewReplicaSetAvailable",
                                  f'ReplicaSet "{rs_name}" has successfully progressed.')
                       if rollout_done else
                       _condition("Progressing", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.'))
        availability = (_condition("Available", "MinimumReplicasAvailable", "Deployment has minimum availability.")
                        if available else
                        _condition("Available", "MinimumReplicasUnavailable",
                                   "Deployment does not have minimum availability.", status="False"))
        for condition in (progressing, availability):
            condition["lastUpdateTime"] = condition["lastTransitionTime"]
            condition.pop("lastProbeTime")
        status = {"observedGeneration": deployment["metadata"].get("generation", 1), "replicas": len(all_pods),
                  "updatedReplicas": len(new_pods), "readyReplicas": ready, "availableReplicas": ready,
                  "conditions": [availability, progressing]}
        if len(all_pods) - ready > 0:
            status["unavailableReplicas"] = len(all_pods) - ready
        self._write_status("deployments", deployment, status, replace=True)

    def _sync_new_replicaset(self, deployment: dict, replicasets: list[dict]) -> dict:
        """Find or create the ReplicaSet of the current template (a rollback finds an old one)
        and give it the desired replicas and the newest revision number."""
        spec = deployment.get("spec") or {}
        template = copy.deepcopy(spec.get("template") or {})
        pod_hash = template_hash(template)
        revisions = [int((rs["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION, "0"))
                     for rs in replicasets]
        namespace = deployment["metadata"]["namespace"]
        desired = spec.get("replicas", 1)
        for rs in replicasets:
            if (rs["metadata"].get("labels") or {}).get("pod-template-hash") == pod_hash:
                revision = (rs["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION, "0")
                if int(revision) < max(revisions):
                    rs["metadata"].setdefault("annotations", {})[REVISION_ANNOTATION] = str(max(revisions) + 1)
                rs["spec"]["replicas"] = desired
                updated = self.store.update("replicasets", namespace, rs["metadata"]["name"], rs)
                self._annotate_revision(deployment, updated)
                return updated
        template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = pod_hash
        selector = copy.deepcopy(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})["pod-template-hash"] = pod_hash
        labels = {**(template["metadata"]["labels"])}
        rs = {"metadata": {"name": f"{deployment['metadata']['name']}-{pod_hash}", "labels": labels,
                           "annotations": {REVISION_ANNOTATION: str(max(revisions, default=0) + 1),
                                           "deployment.kubernetes.io/desired-replicas": str(desired)},
                           "ownerReferences": [_owner_reference(deployment)]},
              "spec": {"replicas": desired, "selector": selector, "template": template}}
        created = self.store.create("replicasets", namespace, rs)
        self._annotate_revision(deployment, created)
        return created

    def _annotate_revision(self, deployment: dict, rs: dict) -> None:
        revision = rs["metadata"]["annotations"][REVISION_ANNOTATION]
        if (deployment["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION) == revision:
            return

        def annotate(current: dict) -> dict:
            current["metadata"].setdefault("annotations", {})[REVISION_ANNOTATION] = revision
            return current
        updated = self.store.mutate("deployments", deployment["metadata"]["namespace"],
                                    deployment["metadata"]["name"], annotate)
        deployment["metadata"] = updated["metadata"]


def _scaled_to(replicas: int):
    def scale(rs: dict) -> dict:
        rs["spec"]["replicas"] = replicas
        return rs
    return scale
