"""JSON merge patch, JSON patch, strategic merge patch, and a small server-side apply.

Strategic merge needs to know which lists merge by which key. The real server reads
that from the Go structs; here a table keyed by field name covers the built-in types
that kubectl, helm and the pipeline touch.
"""

from __future__ import annotations

import copy
from typing import Any

# field name -> merge key; lists not listed here are replaced wholesale.
MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "imagePullSecrets": "name", "conditions": "type", "ownerReferences": "uid",
    "hostAliases": "ip", "topologySpreadConstraints": "topologyKey", "secrets": "name",
    "resourceClaims": "name", "containerStatuses": "name", "initContainerStatuses": "name",
}
PRIMITIVE_SET_LISTS = {"finalizers"}
_ORDER_PREFIX = "$setElementOrder/"
_DELETE_PRIMITIVE_PREFIX = "$deleteFromPrimitiveList/"


class PatchError(ValueError):
    pass


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_key_for(field: str, items: list) -> str | None:
    if field == "ports":
        sample = next((i for i in items if isinstance(i, dict)), {})
        return "containerPort" if "containerPort" in sample else "port"
    return MERGE_KEYS.get(field)


def _merge_keyed_list(original: list, patch: list, key: str) -> list:
    result = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict):
            raise PatchError(f"list merged by {key!r} holds a non-object {item!r}")
        directive = item.get("$patch")
        index = next((i for i, o in enumerate(result) if isinstance(o, dict) and o.get(key) == item.get(key)), None)
        if directive == "delete":
            if index is not None:
                del result[index]
        elif directive == "replace" or index is None:
            result.append({k: v for k, v in copy.deepcopy(item).items() if k != "$patch"})
        else:
            result[index] = strategic_merge(result[index], item)
    return result


def _apply_list(field: str, original: Any, patch: list) -> list:
    if any(isinstance(i, dict) and i.get("$patch") == "replace" and len(i) == 1 for i in patch):
        return [i for i in copy.deepcopy(patch) if not (isinstance(i, dict) and "$patch" in i)]
    if field in PRIMITIVE_SET_LISTS and isinstance(original, list):
        return list(original) + [v for v in patch if v not in original]
    key = _merge_key_for(field, patch)
    if key is None or not isinstance(original, list):
        return [{k: v for k, v in i.items() if k != "$patch"} if isinstance(i, dict) else i
                for i in copy.deepcopy(patch)]
    return _merge_keyed_list(original, patch, key)


def strategic_merge(target: Any, patch: Any) -> Any:
    """Strategic merge patch with the directives kubectl emits ($patch, $retainKeys,
    $setElementOrder, $deleteFromPrimitiveList); element order directives are ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith(_ORDER_PREFIX):
            continue
        if key.startswith(_DELETE_PRIMITIVE_PREFIX):
            field = key[len(_DELETE_PRIMITIVE_PREFIX):]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _apply_list(key, result.get(key), value)
        elif isinstance(value, dict):
            merged = strategic_merge(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise PatchError(f"cannot descend into {part!r}")
    return doc


def _json_add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), value)
    else:
        parent[last] = value
    return doc


def _json_remove(doc: Any, parts: list[str]) -> Any:
    parent = _walk(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        del parent[int(last)]
    else:
        del parent[last]
    return doc


def json_patch(target: Any, operations: list[dict]) -> Any:
    """RFC 6902."""
    doc = copy.deepcopy(target)
    try:
        for op in operations:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "add":
                doc = _json_add(doc, parts, copy.deepcopy(op["value"]))
            elif kind == "remove":
                doc = _json_remove(doc, parts)
            elif kind == "replace":
                _walk(doc, parts)
                doc = _json_add(_json_remove(doc, parts), parts, copy.deepcopy(op["value"])) if parts else op["value"]
            elif kind in ("move", "copy"):
                source = _pointer(op["from"])
                value = copy.deepcopy(_walk(doc, source))
                if kind == "move":
                    doc = _json_remove(doc, source)
                doc = _json_add(doc, parts, value)
            elif kind == "test":
                if _walk(doc, parts) != op["value"]:
                    raise PatchError(f"test failed at {op['path']}")
            else:
                raise PatchError(f"unknown JSON patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise PatchError(f"JSON patch failed: {exc}") from exc
    return doc


def _prune_unapplied(live: Any, previous: Any, current: Any) -> Any:
    """Remove from `live` what the manager applied last time but no longer applies."""
    if not isinstance(live, dict) or not isinstance(previous, dict):
        return live
    current = current if isinstance(current, dict) else {}
    result = dict(live)
    for key, old_value in previous.items():
        if key not in current:
            result.pop(key, None)
        elif isinstance(old_value, dict) and isinstance(current[key], dict):
            result[key] = _prune_unapplied(result.get(key), old_value, current[key])
    return result


def server_side_apply(live: dict, applied: dict, previously_applied: dict | None) -> dict:
    """Apply `applied` as a field manager would: fields it set before and dropped now
    are removed, then its configuration is merged in (maps merge, lists are replaced).

    Ownership is tracked per whole field manager only: no per-field conflicts, and a
    list the manager applies is taken as a whole, which is right while one manager
    (helm, kubectl) owns a workload's spec."""
    base = _prune_unapplied(copy.deepcopy(live), previously_applied or {}, applied)
    return _apply_merge(base, applied)


def _apply_merge(live: Any, applied: Any) -> Any:
    """Maps merge key by key; lists and scalars are taken from the applied configuration."""
    if not isinstance(applied, dict) or not isinstance(live, dict):
        return copy.deepcopy(applied)
    result = dict(live)
    for key, value in applied.items():
        result[key] = _apply_merge(live.get(key), value)
    return result
