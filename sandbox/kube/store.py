"""The emulator's state: objects, resourceVersions, the event history watches resume
from, garbage collection through ownerReferences.

One re-entrant lock guards everything. It is a threading lock (not an asyncio one)
because the HTTP handlers, the controllers and test code in other threads all write.
Listeners are called under the lock, in resourceVersion order, and must not block.
"""

from __future__ import annotations

import collections
import copy
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import defaults, errors
from .catalog import ResourceType, resource_type

HISTORY_LIMIT = 20_000
Key = tuple[str, str, str]  # plural, namespace ("" when cluster-scoped), name


@dataclass(frozen=True)
class StoreEvent:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    plural: str
    obj: dict
    old: dict | None


def _meta(obj: dict) -> dict:
    return obj.setdefault("metadata", {})


def _without_bookkeeping(obj: dict) -> dict:
    """The part of an object whose change bumps metadata.generation."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _comparable(obj: dict) -> dict:
    stripped = copy.deepcopy(obj)
    _meta(stripped).pop("resourceVersion", None)
    _meta(stripped).pop("managedFields", None)
    return stripped


class ObjectStore:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._objects: dict[Key, dict] = {}
        self._rv = 1000
        self._history: collections.deque[StoreEvent] = collections.deque(maxlen=HISTORY_LIMIT)
        self._oldest_valid_rv = self._rv
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self._applied: dict[tuple[Key, str], dict] = {}

    # ---------------------------------------------------------------- reading

    @property
    def resource_version(self) -> int:
        return self._rv

    @staticmethod
    def key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return (rt.plural, (namespace or "default") if rt.namespaced else "", name)

    def find(self, plural: str, namespace: str | None, name: str) -> dict | None:
        with self.lock:
            obj = self._objects.get(self.key(resource_type(plural), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def get(self, plural: str, namespace: str | None, name: str) -> dict:
        obj = self.find(plural, namespace, name)
        if obj is None:
            raise errors.not_found(resource_type(plural), name)
        return obj

    def list(self, plural: str, namespace: str | None = None,
             predicate: Callable[[dict], bool] | None = None) -> tuple[list[dict], int]:
        with self.lock:
            items = [copy.deepcopy(obj) for (p, ns, _), obj in self._objects.items()
                     if p == plural and (namespace is None or ns == namespace)
                     and (predicate is None or predicate(obj))]
            return items, self._rv

    def owned_by(self, owner_uid: str, plural: str | None = None) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(obj) for (p, _, _), obj in self._objects.items()
                    if (plural is None or p == plural)
                    and any(ref.get("uid") == owner_uid for ref in _meta(obj).get("ownerReferences") or [])]

    # ---------------------------------------------------------------- watching

    def subscribe(self, listener: Callable[[StoreEvent], None], since_rv: int | None = None) -> list[StoreEvent]:
        """Register `listener` for future events; return the recorded events after `since_rv`.

        Both happen under the lock, so a watcher sees every event exactly once.
        Raises 410 Gone when `since_rv` is older than the retained history."""
        with self.lock:
            backlog: list[StoreEvent] = []
            if since_rv is not None:
                if since_rv < self._oldest_valid_rv:
                    raise errors.gone(f"too old resource version: {since_rv} ({self._oldest_valid_rv})")
                backlog = [event for event in self._history if event.rv > since_rv]
            self._listeners.append(listener)
            return backlog

    def unsubscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def expire_history(self) -> None:
        with self.lock:
            self._history.clear()
            self._oldest_valid_rv = self._rv

    def _emit(self, event_type: str, plural: str, obj: dict, old: dict | None) -> None:
        event = StoreEvent(self._rv, event_type, plural, copy.deepcopy(obj), copy.deepcopy(old))
        if len(self._history) == self._history.maxlen:
            self._oldest_valid_rv = self._history[0].rv
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # ---------------------------------------------------------------- writing

    def create(self, plural: str, namespace: str | None, obj: dict, *, dry_run: bool = False,
               keep_status: bool = True) -> dict:
        rt = resource_type(plural)
        obj = copy.deepcopy(obj)
        meta = _meta(obj)
        with self.lock:
            name = meta.get("name") or self._generate_name(rt, namespace, meta)
            key = self.key(rt, namespace or meta.get("namespace"), name)
            if key in self._objects:
                raise errors.already_exists(rt, name)
            if rt.has_status and not keep_status:
                obj.pop("status", None)
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
            meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=defaults.now_iso(), generation=1)
            if rt.namespaced:
                meta["namespace"] = key[1]
            else:
                meta.pop("namespace", None)
            for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
                meta.pop(transient, None)
            defaults.on_create(plural, obj)
            if dry_run:
                meta["resourceVersion"] = str(self._rv)
                return obj
            meta["resourceVersion"] = self._next_rv()
            self._objects[key] = obj
            self._emit("ADDED", plural, obj, None)
            return copy.deepcopy(obj)

    def _generate_name(self, rt: ResourceType, namespace: str | None, meta: dict) -> str:
        prefix = meta.get("generateName")
        if not prefix:
            raise errors.invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        for _ in range(100):
            name = prefix + defaults.random_suffix()
            if self.key(rt, namespace or meta.get("namespace"), name) not in self._objects:
                return name
        raise errors.already_exists(rt, prefix)

    def update(self, plural: str, namespace: str | None, name: str, new: dict, *,
               subresource: str | None = None, dry_run: bool = False, check_rv: bool = True) -> dict:
        """PUT semantics: replace the object (or only its status with subresource="status",
        or spec and status at once with "*"); a stale resourceVersion is a 409."""
        rt = resource_type(plural)
        with self.lock:
            current = self._current(rt, namespace, name)
            sent_rv = _meta(new).get("resourceVersion")
            if check_rv and sent_rv and sent_rv != _meta(current)["resourceVersion"]:
                raise errors.conflict(rt, name)
            sent_uid = _meta(new).get("uid")
            if sent_uid and sent_uid != _meta(current)["uid"]:
                raise errors.conflict(rt, name)
            return self._commit(rt, current, copy.deepcopy(new), subresource, dry_run)

    def mutate(self, plural: str, namespace: str | None, name: str, change: Callable[[dict], dict], *,
               subresource: str | None = None, dry_run: bool = False) -> dict:
        """Read-modify-write under the lock (PATCH semantics)."""
        rt = resource_type(plural)
        with self.lock:
            current = self._current(rt, namespace, name)
            return self.update(plural, namespace, name, change(copy.deepcopy(current)),
                               subresource=subresource, dry_run=dry_run)

    def apply(self, plural: str, namespace: str | None, name: str, applied: dict, manager: str, *,
              apply_fn: Callable[[dict, dict, dict | None], dict], dry_run: bool = False) -> tuple[dict, bool]:
        """Server-side apply: create when missing, else merge as `manager`. Returns (object, created)."""
        rt = resource_type(plural)
        with self.lock:
            key = self.key(rt, namespace, name)
            if key not in self._objects:
                created = self.create(plural, namespace, {**applied, "metadata": {**_meta(applied), "name": name}},
                                      dry_run=dry_run, keep_status=False)
                if not dry_run:
                    self._applied[(key, manager)] = copy.deepcopy(applied)
                return created, True
            current = self._objects[key]
            merged = apply_fn(copy.deepcopy(current), applied, self._applied.get((key, manager)))
            _meta(merged)["resourceVersion"] = _meta(current)["resourceVersion"]
            result = self._commit(rt, copy.deepcopy(current), merged, None, dry_run)
            if not dry_run:
                self._applied[(key, manager)] = copy.deepcopy(applied)
            return result, False

    def _current(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self._objects.get(self.key(rt, namespace, name))
        if obj is None:
            raise errors.not_found(rt, name)
        return obj

    def _commit(self, rt: ResourceType, current: dict, new: dict, subresource: str | None, dry_run: bool) -> dict:
        if subresource == "status":
            new = {**copy.deepcopy(current), "status": new.get("status", {})}
        elif subresource == "*":
            pass
        elif rt.has_status and "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        elif rt.has_status:
            new.pop("status", None)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        meta, old_meta = _meta(new), current["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        if subresource not in ("status", "*"):
            defaults.on_update(rt.plural, new)
        if _without_bookkeeping(new) != _without_bookkeeping(current):
            meta["generation"] = old_meta.get("generation", 1) + 1
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if _comparable(new) == _comparable(current):
            return copy.deepcopy(current)
        if dry_run:
            return new
        key = self.key(rt, old_meta.get("namespace"), old_meta["name"])
        meta["resourceVersion"] = self._next_rv()
        self._objects[key] = new
        self._emit("MODIFIED", rt.plural, new, current)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and old_meta.get("finalizers"):
            self._remove(key)
        return copy.deepcopy(new)

    # ---------------------------------------------------------------- deleting

    def delete(self, plural: str, namespace: str | None, name: str, *, propagation: str | None = None,
               preconditions: dict | None = None, dry_run: bool = False) -> dict:
        """Delete an object and, unless orphaning, its dependents (ownerReferences).

        The real garbage collector works asynchronously; here dependents go at once,
        before the owner for Foreground and after it for Background."""
        rt = resource_type(plural)
        with self.lock:
            current = self._current(rt, namespace, name)
            meta = current["metadata"]
            preconditions = preconditions or {}
            if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
                raise errors.conflict(rt, name)
            if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != meta["resourceVersion"]:
                raise errors.conflict(rt, name)
            if dry_run:
                return copy.deepcopy(current)
            key = self.key(rt, meta.get("namespace"), name)
            if meta.get("finalizers"):
                if meta.get("deletionTimestamp"):
                    return copy.deepcopy(current)
                marked = copy.deepcopy(current)
                marked["metadata"]["deletionTimestamp"] = defaults.now_iso()
                marked["metadata"]["deletionGracePeriodSeconds"] = 0
                if plural == "namespaces":
                    # kubernetes/kubernetes pkg/registry/core/namespace/storage/storage.go REST.Delete
                    marked.setdefault("status", {})["phase"] = "Terminating"
                marked["metadata"]["resourceVersion"] = self._next_rv()
                self._objects[key] = marked
                self._emit("MODIFIED", plural, marked, current)
                return copy.deepcopy(marked)
            policy = propagation or "Background"
            if policy == "Orphan":
                self._orphan_dependents(meta["uid"])
            elif policy == "Foreground":
                self._delete_dependents(meta["uid"], policy)
            removed = self._remove(key)
            if policy == "Background":
                self._delete_dependents(meta["uid"], policy)
            if plural == "namespaces":
                self._delete_namespace_contents(name)
            return removed

    def mark_deleting(self, plural: str, namespace: str | None, name: str, grace_seconds: int | None = None) -> dict:
        """A graceful delete's first step: set `deletionTimestamp` and keep the object until its
        owner of the grace period (the kubelet, for a pod) deletes it for good."""
        rt = resource_type(plural)
        with self.lock:
            current = self._current(rt, namespace, name)
            if current["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(current)
            marked = copy.deepcopy(current)
            grace = grace_seconds if grace_seconds is not None else \
                (marked.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            marked["metadata"]["deletionTimestamp"] = defaults.now_iso()
            marked["metadata"]["deletionGracePeriodSeconds"] = grace
            marked["metadata"]["resourceVersion"] = self._next_rv()
            key = self.key(rt, current["metadata"].get("namespace"), name)
            self._objects[key] = marked
            self._emit("MODIFIED", plural, marked, current)
            return copy.deepcopy(marked)

    def _remove(self, key: Key) -> dict:
        obj = self._objects.pop(key)
        for applied_key in [k for k in self._applied if k[0] == key]:
            del self._applied[applied_key]
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("DELETED", key[0], obj, obj)
        return obj

    def _dependents(self, owner_uid: str) -> list[Key]:
        return [key for key, obj in self._objects.items()
                if any(ref.get("uid") == owner_uid for ref in _meta(obj).get("ownerReferences") or [])]

    def _delete_dependents(self, owner_uid: str, policy: str) -> None:
        for plural, namespace, name in self._dependents(owner_uid):
            if (plural, namespace, name) in self._objects:
                self.delete(plural, namespace, name, propagation=policy)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for plural, namespace, name in self._dependents(owner_uid):
            def drop_reference(obj: dict) -> dict:
                refs = [r for r in obj["metadata"].get("ownerReferences", []) if r.get("uid") != owner_uid]
                obj["metadata"]["ownerReferences"] = refs
                return obj
            self.mutate(plural, namespace, name, drop_reference)

    def _delete_namespace_contents(self, namespace: str) -> None:
        for plural, ns, name in [k for k in self._objects if k[1] == namespace]:
            if (plural, ns, name) in self._objects:
                self.delete(plural, ns, name)
