"""The NamespaceLifecycle admission plugin: no new content in a namespace that does not exist or is terminating.

kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/admission/plugin/namespace/lifecycle/admission.go
(read at 04791b4, the plugin every API server enables by default), `Lifecycle.Admit`:
- the immortal namespaces `default`, `kube-system` and `kube-public` may not be deleted
  (403 `namespaces "default" is forbidden: this namespace may not be deleted`);
- cluster-scoped objects, Namespaces themselves and every DELETE pass;
- a CREATE or UPDATE in a namespace that does not exist answers the namespace lookup's own error,
  404 `namespaces "x" not found`;
- a CREATE in a namespace whose `status.phase` is `Terminating` answers admission.NewForbidden
  (staging/src/k8s.io/apiserver/pkg/admission/errors.go: the name from the URL, else the object's name,
  else its generateName, else `Unknown`) with the cause `NamespaceTerminating` on `metadata.namespace`.
The plugin's `localsubjectaccessreviews` exception is moot: the emulator serves no access reviews.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors
from .catalog import ResourceType, resource_type

if TYPE_CHECKING:
    from .store import ObjectStore

IMMORTAL_NAMESPACES = ("default", "kube-system", "kube-public")
# staging/src/k8s.io/api/core/v1/types.go NamespaceTerminatingCause
NAMESPACE_TERMINATING_CAUSE = "NamespaceTerminating"


def _forbidden(rt: ResourceType, name: str, why: str) -> errors.ApiError:
    """apierrors.NewForbidden(resource, name, err) (staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go)."""
    return errors.ApiError(403, f'{rt.qualified_name} "{name}" is forbidden: {why}', "Forbidden",
                           {"name": name, "group": rt.group, "kind": rt.plural})


def _object_name(url_name: str | None, body: dict | None) -> str:
    """admission.extractResourceName: the name on the URL, else the object's name or generateName."""
    if url_name:
        return url_name
    meta = (body.get("metadata") if isinstance(body, dict) else None) or {}
    return meta.get("name") or meta.get("generateName") or "Unknown"


def operation_of(store: ObjectStore, rt: ResourceType, namespace: str | None, verb: str, name: str | None,
                 content_type: str) -> str | None:
    """The admission operation of a request: a server-side apply of a missing object is a CREATE
    (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go), an update or patch of a missing object
    answers the object's own 404 before admission runs (registry/generic/registry/store.go Update)."""
    if verb == "create":
        return "CREATE"
    if verb in ("delete", "deletecollection"):
        return "DELETE"
    if verb not in ("update", "patch") or not name:
        return None
    exists = store.find(rt.plural, namespace, name) is not None
    if exists:
        return "UPDATE"
    applying = content_type.split(";")[0].strip() == "application/apply-patch+yaml"
    return "CREATE" if verb == "patch" and applying else None


def admit_request(store: ObjectStore, rt: ResourceType, namespace: str | None, verb: str, name: str | None,
                  body, content_type: str) -> None:
    """`admit` for one API request, as the API server's admission chain calls the plugin."""
    if namespace is None and rt.namespaced and isinstance(body, dict):
        namespace = (body.get("metadata") or {}).get("namespace")  # the emulator takes it from the body then
    operation = operation_of(store, rt, namespace, verb, name, content_type)
    if operation is not None:
        admit(store, rt, namespace, operation, name, body)


def admit(store: ObjectStore, rt: ResourceType, namespace: str | None, operation: str,
          name: str | None = None, body: dict | None = None) -> None:
    """Raise the plugin's error for `operation` (CREATE, UPDATE or DELETE) of `rt` in `namespace`, if any."""
    if rt.plural == "namespaces":
        if operation == "DELETE" and name in IMMORTAL_NAMESPACES:
            raise _forbidden(rt, name, "this namespace may not be deleted")
        return
    if not namespace or not rt.namespaced or operation == "DELETE":
        return
    found = store.find("namespaces", None, namespace)
    if found is None:
        raise errors.not_found(resource_type("namespaces"), namespace)
    if operation == "CREATE" and (found.get("status") or {}).get("phase") == "Terminating":
        error = _forbidden(rt, _object_name(name, body),
                           f"unable to create new content in namespace {namespace} because it is being terminated")
        error.details["causes"] = [{"reason": NAMESPACE_TERMINATING_CAUSE,
                                    "message": f"namespace {namespace} is being terminated",
                                    "field": "metadata.namespace"}]
        raise error
