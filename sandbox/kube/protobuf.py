"""Decoding of `application/vnd.kubernetes.protobuf` request bodies into JSON-shaped dicts.

client-go's typed clients (helm's release storage, some kubectl commands) send
built-in objects as protobuf: the magic `k8s\\0`, then a `runtime.Unknown` message
whose `typeMeta` names the kind and whose `raw` holds the object. Only the kinds the
pipeline's tools send are described here; their field numbers come from the
`protobuf:"..."` tags of k8s.io/api and k8s.io/apimachinery. Fields a schema does
not list are skipped, like any protobuf reader does with unknown fields.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

MAGIC = b"k8s\x00"

Schema = dict[int, tuple[str, Any]]

TIME: Schema = {1: ("seconds", "int"), 2: ("nanos", "int")}
TYPE_META: Schema = {1: ("apiVersion", "string"), 2: ("kind", "string")}
UNKNOWN: Schema = {1: ("typeMeta", TYPE_META), 2: ("raw", "raw"), 3: ("contentEncoding", "string"),
                   4: ("contentType", "string")}
OWNER_REFERENCE: Schema = {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                           5: ("apiVersion", "string"), 6: ("controller", "bool"),
                           7: ("blockOwnerDeletion", "bool")}
OBJECT_META: Schema = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
    5: ("uid", "string"), 6: ("resourceVersion", "string"), 7: ("generation", "int"),
    8: ("creationTimestamp", "time"), 11: ("labels", ("map", "string")),
    12: ("annotations", ("map", "string")), 13: ("ownerReferences", ("repeated", OWNER_REFERENCE)),
    14: ("finalizers", ("repeated", "string")),
}
SECRET: Schema = {1: ("metadata", OBJECT_META), 2: ("data", ("map", "base64")), 3: ("type", "string"),
                  4: ("stringData", ("map", "string")), 5: ("immutable", "bool")}
CONFIG_MAP: Schema = {1: ("metadata", OBJECT_META), 2: ("data", ("map", "string")),
                      3: ("binaryData", ("map", "base64")), 4: ("immutable", "bool")}
NAMESPACE: Schema = {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", ("repeated", "string"))}),
                     3: ("status", {1: ("phase", "string")})}
SERVICE_ACCOUNT: Schema = {1: ("metadata", OBJECT_META),
                           3: ("imagePullSecrets", ("repeated", {1: ("name", "string")})),
                           4: ("automountServiceAccountToken", "bool")}
DELETE_OPTIONS: Schema = {1: ("gracePeriodSeconds", "int"),
                          2: ("preconditions", {1: ("uid", "string"), 2: ("resourceVersion", "string")}),
                          3: ("orphanDependents", "bool"), 4: ("propagationPolicy", "string"),
                          5: ("dryRun", ("repeated", "string"))}
# kubernetes/api authorization/v1/generated.proto (k8s.io/api v0.35.0, the protobuf field numbers of
# SelfSubjectAccessReview, ResourceAttributes, NonResourceAttributes): what `kubectl auth can-i` sends
RESOURCE_ATTRIBUTES: Schema = {1: ("namespace", "string"), 2: ("verb", "string"), 3: ("group", "string"),
                               4: ("version", "string"), 5: ("resource", "string"), 6: ("subresource", "string"),
                               7: ("name", "string")}
NON_RESOURCE_ATTRIBUTES: Schema = {1: ("path", "string"), 2: ("verb", "string")}
SELF_SUBJECT_ACCESS_REVIEW: Schema = {1: ("metadata", OBJECT_META), 2: ("spec", {
    1: ("resourceAttributes", RESOURCE_ATTRIBUTES), 2: ("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES)})}

SCHEMAS_BY_KIND: dict[str, Schema] = {
    "Secret": SECRET, "ConfigMap": CONFIG_MAP, "Namespace": NAMESPACE,
    "ServiceAccount": SERVICE_ACCOUNT, "DeleteOptions": DELETE_OPTIONS,
    "SelfSubjectAccessReview": SELF_SUBJECT_ACCESS_REVIEW,
}


class ProtobufError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) where value is an int or bytes."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        yield number, wire, value


def _scalar(kind: Any, value: Any) -> Any:
    if isinstance(kind, dict):
        return decode_message(value, kind)
    if kind == "string":
        return value.decode("utf-8")
    if kind == "base64":
        return base64.b64encode(value).decode("ascii")
    if kind == "raw":
        return value
    if kind == "bool":
        return bool(value)
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "time":
        # kubernetes/apimachinery pkg/apis/meta/v1/time_proto.go (v0.35.0): a zero Time marshals to an empty
        # message and unmarshals back to the zero Time, which JSON writes as null
        if not value:
            return None
        seconds = decode_message(value, TIME).get("seconds", 0)
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise ProtobufError(f"unknown field kind {kind!r}")


def decode_message(buf: bytes, schema: Schema) -> dict:
    result: dict[str, Any] = {}
    for number, _wire, value in _fields(buf):
        if number not in schema:
            continue
        name, kind = schema[number]
        if isinstance(kind, tuple) and kind[0] == "map":
            entry = decode_message(value, {1: ("key", "string"), 2: ("value", kind[1])})
            default = "" if kind[1] in ("string", "base64") else None
            result.setdefault(name, {})[entry.get("key", "")] = entry.get("value", default)
        elif isinstance(kind, tuple) and kind[0] == "repeated":
            result.setdefault(name, []).append(_scalar(kind[1], value))
        else:
            decoded = _scalar(kind, value)
            if decoded is not None and (decoded not in ("", 0, False) or isinstance(decoded, dict)):
                result[name] = decoded
    return result


def decode_object(body: bytes) -> dict:
    """Decode a `k8s\\0`-enveloped protobuf body into the JSON form of the object."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf magic prefix")
    envelope = decode_message(body[len(MAGIC):], UNKNOWN)
    type_meta = envelope.get("typeMeta", {})
    kind = type_meta.get("kind", "")
    schema = SCHEMAS_BY_KIND.get(kind)
    if schema is None:
        raise ProtobufError(f"the emulator cannot decode protobuf for kind {kind!r}")
    obj = decode_message(envelope.get("raw", b""), schema)
    return {"apiVersion": type_meta.get("apiVersion", "v1"), "kind": kind, **obj}
