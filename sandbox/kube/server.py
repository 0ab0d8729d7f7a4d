"""The Kubernetes REST API over aiohttp: routing, verbs, watch streams, pod logs, faults."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import yaml
from aiohttp import web

from . import (catalog, defaults, errors, forward, namespace_lifecycle, patching, podsecurity, protobuf, selectors,
               services, tables)
from .catalog import ResourceType
from .pods import POD_IP, container_names, is_terminal

if TYPE_CHECKING:
    from .emulator import KubeEmulator

log = logging.getLogger(__name__)

NAMESPACE_SUBRESOURCES = {"status", "finalize"}
JSON = "application/json"
DROP = object()  # put into a watch queue to end the stream
USER = web.RequestKey("user", object)  # the authenticated rbac.User of a request


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict
    verb: str
    group: str | None = None
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    content_type: str | None = None
    status: int = 0
    user: str | None = None
    time: float = field(default_factory=time.monotonic)


@dataclass
class Fault:
    method: str
    path_regex: re.Pattern
    status: int
    remaining: int
    after: bool
    retry_after: int | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method.upper())) and bool(self.path_regex.search(path))


@dataclass
class Route:
    """A parsed API path. `plural` is None for discovery documents."""
    group: str
    version: str
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    watch_prefix: bool = False


def parse_api_path(path: str) -> Route | None:
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        route, rest = Route("", parts[1]), parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        route, rest = Route(parts[1], parts[2]), parts[3:]
    else:
        return None
    if rest and rest[0] == "watch":
        route.watch_prefix, rest = True, rest[1:]
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in NAMESPACE_SUBRESOURCES:
        route.namespace, rest = rest[1], rest[2:]
    if rest:
        route.plural = rest[0]
        route.name = rest[1] if len(rest) > 1 else None
        route.subresource = "/".join(rest[2:]) or None
    return route


def flag(query: dict, name: str) -> bool:
    """A boolean query parameter, parsed like Go's strconv.ParseBool."""
    return query.get(name, "") in ("1", "t", "T", "true", "TRUE", "True")


def verb_of(method: str, route: Route | None, query: dict) -> str:
    if route is None or route.plural is None:
        return "get"
    watching = route.watch_prefix or flag(query, "watch")
    if method == "GET":
        return "watch" if watching else ("get" if route.name else "list")
    if method == "DELETE":
        return "delete" if route.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":")).encode(), status=status, content_type=JSON)


def error_response(exc: errors.ApiError) -> web.Response:
    return json_response(exc.status(), exc.code)


def fault_response(fault: Fault) -> web.Response:
    """The injected error; with `retry_after`, the header and Status detail a throttling API server sends."""
    if fault.retry_after is None:
        return error_response(errors.injected(fault.status))
    exc = errors.ApiError(fault.status, errors.injected(fault.status).message,
                          details={"retryAfterSeconds": fault.retry_after})
    response = error_response(exc)
    response.headers["Retry-After"] = str(fault.retry_after)
    return response


def decode_body(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if content_type == "application/vnd.kubernetes.protobuf" or raw.startswith(protobuf.MAGIC):
        try:
            return protobuf.decode_object(raw)
        except protobuf.ProtobufError as exc:
            raise errors.ApiError(415, str(exc), "UnsupportedMediaType") from exc
    try:
        return json.loads(raw)
    except ValueError:
        pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise errors.bad_request(f"cannot decode the request body: {exc}") from exc


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


class ApiServer:
    def __init__(self, emulator: KubeEmulator):
        self.emulator = emulator
        self.store = emulator.store
        self.records: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.open_watches: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    # ---------------------------------------------------------------- plumbing

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def drop_watches(self) -> None:
        if self.loop is None:
            return
        for queue in list(self.open_watches):
            self.loop.call_soon_threadsafe(queue.put_nowait, DROP)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = parse_api_path(request.path)
        query = dict(request.query)
        record = RequestRecord(
            method=request.method, path=request.path, query=query, verb=verb_of(request.method, route, query),
            group=route.group if route else None, resource=route.plural if route else None,
            subresource=route.subresource if route else None, namespace=route.namespace if route else None,
            name=route.name if route else None, content_type=request.headers.get("Content-Type"))
        with self.lock:
            self.records.append(record)
        user, refused = self.emulator.rbac.check(request.method, request.path, request.query_string, request.headers)
        record.user = user.name if user else None
        request[USER] = user
        fault = None if refused else self._take_fault(request.method, request.path)
        if refused is not None:
            response: web.StreamResponse = error_response(refused)
        elif fault is not None and not fault.after:
            response = fault_response(fault)
        else:
            try:
                response = await self.dispatch(request, route, query, record)
            except errors.ApiError as exc:
                response = error_response(exc)
            except Exception as exc:
                log.exception("the emulator failed on %s %s", request.method, request.path_qs)
                response = error_response(errors.ApiError(500, f"emulator bug: {exc!r}", "InternalError"))
            if fault is not None and not response.prepared:
                response = fault_response(fault)
        if not record.status:
            record.status = response.status
        return response

    async def dispatch(self, request: web.Request, route: Route | None, query: dict,
                       record: RequestRecord) -> web.StreamResponse:
        if route is None or route.plural is None:
            return self.serve_non_resource(request.path, route)
        rt = catalog.lookup(route.group, route.version, route.plural)
        if rt is None:
            raise errors.ApiError(404, "the server could not find the requested resource", "NotFound")
        if rt.namespaced is False and route.namespace is not None:
            raise errors.ApiError(404, "the server could not find the requested resource", "NotFound")
        namespace = route.namespace if rt.namespaced else None
        if rt.plural == "services" and route.name and (route.subresource or "").split("/")[0] == "proxy":
            return await self.serve_service_proxy(request, namespace or "default", route.name)
        body = decode_body(await request.read(), request.content_type) if request.can_read_body else None
        verb = record.verb
        if rt.plural == "selfsubjectaccessreviews":
            # create only: the review is computed, never stored (kubernetes/kubernetes
            # pkg/registry/authorization/selfsubjectaccessreview/rest.go, v1.35: a Creater and nothing else); any
            # other verb is 405 MethodNotAllowed, as the apiserver's installer answers a verb a resource lacks
            # (kubernetes/apiserver pkg/endpoints/installer.go, v0.35.0)
            if verb != "create" or route.name is not None or route.subresource is not None:
                raise errors.ApiError(405, "the server does not allow this method on the requested resource",
                                      "MethodNotAllowed")
            return json_response(self.emulator.rbac.self_subject_access_review(request.get(USER), body), 201)
        namespace_lifecycle.admit_request(self.store, rt, namespace, verb, route.name, body,
                                          request.headers.get("Content-Type", ""))
        if verb == "watch":
            return await self.serve_watch(request, rt, namespace, route.name, query, record)
        as_table = tables.wants_table(request.headers.get("Accept", ""))
        if verb == "list":
            return self.serve_list(rt, namespace, query, as_table)
        if route.subresource == "log" and verb == "get":
            return await self.serve_log(request, namespace, route.name, query, record)
        if rt.plural == "pods" and route.subresource == "eviction" and verb == "create":
            return self.serve_eviction(namespace, route.name)
        if rt.plural == "serviceaccounts" and route.subresource == "token" and verb == "create":
            self.store.get(rt.plural, namespace, route.name)
            return json_response(self.emulator.rbac.token_request(namespace, route.name, body), 201)
        if route.subresource not in (None, "status", "scale"):
            raise errors.ApiError(404, "the server could not find the requested resource", "NotFound")
        if verb == "get":
            obj = self.store.get(rt.plural, namespace, route.name)
            if route.subresource == "scale":
                return json_response(to_scale(obj))
            if as_table:
                return json_response(tables.table(rt, [obj], obj["metadata"]["resourceVersion"]))
            return json_response(obj)
        escalation = self.emulator.rbac.escalation_check(request.get(USER), rt.plural, rt.group, namespace,
                                                         route.name, verb)
        if escalation is not None and route.subresource is None:
            return self.serve_checked_write(escalation, rt, namespace, route, body, query, verb, request.content_type)
        if verb == "create":
            return self.serve_create(rt, namespace, route, body, query)
        if verb == "update":
            return self.serve_update(rt, namespace, route, body, query)
        if verb == "patch":
            return self.serve_patch(rt, namespace, route, body, query, request.content_type)
        if verb == "delete":
            return self.serve_delete(rt, namespace, route.name, body, query)
        if verb == "deletecollection":
            return self.serve_delete_collection(rt, namespace, query)
        raise errors.ApiError(405, "the server does not allow this method on the requested resource",
                              "MethodNotAllowed")

    async def serve_service_proxy(self, request: web.Request, namespace: str, id_: str) -> web.StreamResponse:
        """`/api/v1/namespaces/{ns}/services/{id}/proxy[/{path}]` (pkg/registry/core/service/storage/storage.go
        ResourceLocation, pkg/registry/core/service/proxy.go ProxyREST, v1.35): the request goes to a ready
        endpoint with the rest of the path and the query; RBAC has already checked `services/proxy` with the verb
        of the method (requestinfo.go). A dial that fails answers 503 `error trying to reach service: <Go's dial
        error>` (kubernetes/apimachinery pkg/util/proxy/transport.go Transport.RoundTrip, which upgradeaware.go
        wraps around the proxy's transport; checked at eed236ce, v0.36 pre-release). A GET or HEAD of `.../proxy`
        itself, with no path after it, is answered 301 to the same path with a `/` (and the query) once the
        Service has an endpoint (upgradeaware.go proxyRedirectsforRootPath; the location's path is empty:
        ProxyREST joins it with utilnet.JoinPreservingTrailingSlash)."""
        if request.method not in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
            raise errors.ApiError(405, "the server does not allow this method on the requested resource",
                                  "MethodNotAllowed")
        scheme, endpoint = services.proxy_target(self.emulator, namespace, id_)
        marker = f"/services/{id_}/proxy"
        raw = request.raw_path.split("?", 1)[0]
        rest = raw[raw.find(marker) + len(marker):] if marker in raw else ""
        query = f"?{request.query_string}" if request.query_string else ""
        if not rest and request.method in ("GET", "HEAD"):
            return web.Response(status=301, headers={"Location": f"{request.path}/{query}"})
        path_qs = (rest or "/") + query
        address = f"{POD_IP}:{endpoint.container_port}"
        if scheme == "https" or endpoint.host_port is None:
            why = "connect: connection refused" if endpoint.host_port is None else "the sandbox's pods serve http only"
            raise errors.ApiError(503, f"error trying to reach service: dial tcp {address}: {why}")
        try:
            return await forward.forward(request, endpoint.host_port, path_qs, drop=frozenset({"authorization"}))
        except aiohttp.ClientConnectionError:
            raise errors.ApiError(503, f"error trying to reach service: dial tcp {address}: connect: "
                                       "connection refused") from None

    # ---------------------------------------------------------------- discovery

    def serve_non_resource(self, path: str, route: Route | None) -> web.Response:
        doc: Any = None
        if path in ("/api", "/api/"):
            doc = catalog.api_versions_doc()
        elif path in ("/apis", "/apis/"):
            doc = catalog.api_group_list_doc()
        elif route is not None:
            doc = catalog.api_resource_list_doc(route.group, route.version)
        elif re.fullmatch(r"/apis/[^/]+/?", path):
            doc = catalog.api_group_doc(path.strip("/").split("/")[1])
        elif path in ("/version", "/version/"):  # k8s.io/apiserver pkg/server/routes/version.go: the route is "/"
            # under the "/version" WebService; kubernetes_asyncio's VersionApi asks `/version/`
            doc = {"major": "1", "minor": "35", "gitVersion": "v1.35.0-sandbox", "gitCommit": "sandbox",
                   "gitTreeState": "clean", "buildDate": "2025-12-01T00:00:00Z", "goVersion": "go1.25.0",
                   "compiler": "gc", "platform": "linux/amd64"}
        elif path.startswith("/openapi/v3"):
            doc = openapi_v3(path)
        elif path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        elif path == "/":
            doc = {"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/openapi/v3", "/readyz",
                             "/version"]}
        if doc is None:
            raise errors.ApiError(404, "the server could not find the requested resource", "NotFound")
        return json_response(doc)

    # ---------------------------------------------------------------- reads

    def serve_list(self, rt: ResourceType, namespace: str | None, query: dict, as_table: bool) -> web.Response:
        matches = object_filter(query)
        items, rv = self.store.list(rt.plural, namespace, matches)
        if as_table:
            return json_response(tables.table(rt, items, str(rv)))
        return json_response({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": str(rv)}, "items": items})

    async def serve_watch(self, request: web.Request, rt: ResourceType, namespace: str | None,
                          name: str | None, query: dict, record: RequestRecord) -> web.StreamResponse:
        matches = object_filter(query, name)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def listener(event) -> None:
            if event.plural == rt.plural:
                loop.call_soon_threadsafe(queue.put_nowait, event)

        since = query.get("resourceVersion") or None
        send_initial = flag(query, "sendInitialEvents") or since in (None, "0")
        gone: errors.ApiError | None = None
        initial: list[dict] = []
        backlog = []
        rv = 0
        with self.store.lock:
            try:
                if send_initial:
                    self.store.subscribe(listener)
                    initial, rv = self.store.list(rt.plural, namespace, matches)
                else:
                    backlog = self.store.subscribe(listener, int(since))
            except errors.ApiError as exc:
                gone = exc
            except ValueError:
                raise errors.bad_request(f"invalid resourceVersion {since!r}") from None

        response = web.StreamResponse(status=200, headers={"Content-Type": JSON,
                                                           "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        record.status = 200
        self.open_watches.add(queue)
        # a watcher that goes away, even before the headers, ends its watch, not an error of the server: the watch
        # ends with its request's context (kubernetes/apiserver pkg/endpoints/handlers/watch.go serveWatchHandler,
        # v0.35.0, returns on `<-ctx.Done()`), and its cacher watcher is stopped
        try:
            await response.prepare(request)
            if gone is not None:
                await response.write(_line({"type": "ERROR", "object": gone.status()}))
                return response
            for obj in initial:
                await response.write(_line({"type": "ADDED", "object": obj}))
            if flag(query, "sendInitialEvents") and flag(query, "allowWatchBookmarks"):
                await response.write(_line(bookmark(rt, rv, initial_events_end=True)))
            for event in backlog:
                await self._write_event(response, event, namespace, matches)
            await self._stream_events(response, queue, namespace, matches, query)
        except ConnectionResetError:
            pass
        finally:
            self.store.unsubscribe(listener)
            self.open_watches.discard(queue)
        return response

    async def _stream_events(self, response: web.StreamResponse, queue: asyncio.Queue, namespace: str | None,
                             matches, query: dict) -> None:
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None
        while not self.stopping:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                event = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                return
            if event is DROP:
                return
            await self._write_event(response, event, namespace, matches)

    async def _write_event(self, response: web.StreamResponse, event, namespace: str | None, matches) -> None:
        event_type = watch_event_type(event, namespace, matches)
        if event_type is not None:
            await response.write(_line({"type": event_type, "object": event.obj}))

    async def serve_log(self, request: web.Request, namespace: str | None, name: str | None, query: dict,
                        record: RequestRecord) -> web.StreamResponse:
        pod = self.store.get("pods", namespace, name)
        container = query.get("container") or container_names(pod)[0]
        if container not in container_names(pod):
            raise errors.bad_request(f"container {container} is not valid for pod {name}")
        logs = self.emulator.logs
        ns = pod["metadata"]["namespace"]
        chunks = logs.chunks(ns, name, container)
        if not chunks and not container_started(pod, container):
            raise errors.bad_request(f'container "{container}" in pod "{name}" is waiting to start: '
                                     "ContainerCreating")
        text = render_log(chunks, query)
        if not flag(query, "follow"):
            return web.Response(text=text, content_type="text/plain")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        record.status = 200
        sent = len(chunks)
        # a follower that goes away ends its stream, not an error of the server (kubernetes/apiserver
        # pkg/registry/generic/rest/streamer.go, v0.35.0: the log stream is copied until the client's writer fails)
        try:
            await response.prepare(request)
            await self._write_log(response, text)
            while not self.stopping:
                current = self.store.find("pods", ns, name)
                fresh = logs.chunks(ns, name, container, sent)
                if fresh:
                    sent += len(fresh)
                    await self._write_log(response, render_log(fresh, {"timestamps": query.get("timestamps", "")}))
                if current is None or is_terminal(current) or container_finished(current, container):
                    if not fresh:
                        break
                    continue
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            pass
        return response

    async def _write_log(self, response: web.StreamResponse, text: str) -> None:
        data, rate = text.encode(), self.emulator.log_bytes_per_second
        if not rate:
            await response.write(data)
            return
        slice_size = max(1, int(rate / 20))
        for start in range(0, len(data), slice_size):
            await response.write(data[start:start + slice_size])
            await asyncio.sleep(slice_size / rate)

    # ---------------------------------------------------------------- writes

    def serve_create(self, rt: ResourceType, namespace: str | None, route: Route, body: Any,
                     query: dict) -> web.Response:
        if route.name is not None:
            raise errors.ApiError(405, "the server does not allow this method on the requested resource",
                                  "MethodNotAllowed")
        obj = require_object(body, rt)
        body_namespace = (obj.get("metadata") or {}).get("namespace")
        if rt.namespaced and body_namespace and namespace and body_namespace != namespace:
            raise errors.bad_request("the namespace of the provided object does not match the namespace sent "
                                     "on the request")
        if rt.plural == "pods":
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + defaults.random_suffix()
            ns = namespace or body_namespace or "default"
            podsecurity.admit_pod(self.store.find("namespaces", None, ns), obj)
        created = self.store.create(rt.plural, namespace or body_namespace, obj, dry_run=is_dry_run(query),
                                    keep_status=False)
        return json_response(created, 201)

    def serve_checked_write(self, escalation, rt: ResourceType, namespace: str | None, route: Route, body: Any,
                            query: dict, verb: str, content_type: str) -> web.Response:
        """A write of a Role, ClusterRole or binding by a non-admin: the object it would store passes the RBAC
        escalation check first (rbac.EscalationCheck), atomically with the write."""
        serve = {"create": lambda q: self.serve_create(rt, namespace, route, body, q),
                 "update": lambda q: self.serve_update(rt, namespace, route, body, q),
                 "patch": lambda q: self.serve_patch(rt, namespace, route, body, q, content_type)}[verb]
        with self.store.lock:
            old = self.store.find(rt.plural, namespace, route.name) if route.name else None
            escalation.check(json.loads(serve({**query, "dryRun": "All"}).body), old)
            return serve(query)

    def serve_update(self, rt: ResourceType, namespace: str | None, route: Route, body: Any,
                     query: dict) -> web.Response:
        obj = require_object(body, rt)
        if route.subresource == "scale":
            replicas = (obj.get("spec") or {}).get("replicas", 0)
            updated = self.store.mutate(rt.plural, namespace, route.name,
                                        lambda cur: {**cur, "spec": {**cur.get("spec", {}), "replicas": replicas}})
            return json_response(to_scale(updated))
        name = (obj.get("metadata") or {}).get("name")
        if name and name != route.name:
            raise errors.bad_request("the name of the object does not match the name on the URL")
        updated = self.store.update(rt.plural, namespace, route.name, obj, subresource=route.subresource,
                                    dry_run=is_dry_run(query))
        return json_response(updated)

    def serve_patch(self, rt: ResourceType, namespace: str | None, route: Route, body: Any, query: dict,
                    content_type: str) -> web.Response:
        if body is None:
            raise errors.bad_request("the patch body is empty")
        dry_run = is_dry_run(query)
        if content_type == "application/apply-patch+yaml":
            return self.serve_apply(rt, namespace, route, body, query)
        apply_patch = patch_function(content_type, body)
        if route.subresource == "scale":
            def change_scale(current: dict) -> dict:
                scale = apply_patch(to_scale(current))
                return {**current, "spec": {**current.get("spec", {}), "replicas": scale["spec"]["replicas"]}}
            return json_response(to_scale(self.store.mutate(rt.plural, namespace, route.name, change_scale)))
        patched = self.store.mutate(rt.plural, namespace, route.name, apply_patch, subresource=route.subresource,
                                    dry_run=dry_run)
        return json_response(patched)

    def serve_apply(self, rt: ResourceType, namespace: str | None, route: Route, body: Any,
                    query: dict) -> web.Response:
        manager = query.get("fieldManager")
        if not manager:
            raise errors.bad_request("PATCH requests with application/apply-patch+yaml require a fieldManager")
        obj = require_object(body, rt)
        if route.subresource == "status":
            patched = self.store.mutate(rt.plural, namespace, route.name,
                                        lambda cur: patching.server_side_apply(cur, obj, None),
                                        subresource="status", dry_run=is_dry_run(query))
            return json_response(patched)
        result, created = self.store.apply(rt.plural, namespace, route.name, obj, manager,
                                           apply_fn=patching.server_side_apply, dry_run=is_dry_run(query))
        return json_response(result, 201 if created else 200)

    def serve_eviction(self, namespace: str | None, name: str | None) -> web.Response:
        """The Eviction API for a pod no PodDisruptionBudget covers: 201 with a Success Status
        (kubernetes/kubernetes pkg/registry/core/pod/storage/eviction.go, v1.33)."""
        self.store.get("pods", namespace, name)
        self.emulator.evict(namespace or "default", name)
        return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "code": 201}, 201)

    def serve_delete(self, rt: ResourceType, namespace: str | None, name: str | None, body: Any,
                     query: dict) -> web.Response:
        options = body if isinstance(body, dict) else {}
        propagation = query.get("propagationPolicy") or options.get("propagationPolicy")
        if propagation is None and (options.get("orphanDependents") or flag(query, "orphanDependents")):
            propagation = "Orphan"
        dry_run = is_dry_run(query) or "All" in (options.get("dryRun") or [])
        deleted = self.store.delete(rt.plural, namespace, name, propagation=propagation,
                                    preconditions=options.get("preconditions"), dry_run=dry_run)
        if rt.plural == "pods" and not dry_run:
            self.emulator.logs.forget(deleted["metadata"].get("namespace", ""), deleted["metadata"]["name"])
        return json_response(deleted)

    def serve_delete_collection(self, rt: ResourceType, namespace: str | None, query: dict) -> web.Response:
        items, _ = self.store.list(rt.plural, namespace, object_filter(query))
        deleted = []
        for obj in items:
            try:
                deleted.append(self.store.delete(rt.plural, obj["metadata"].get("namespace"),
                                                 obj["metadata"]["name"],
                                                 propagation=query.get("propagationPolicy")))
            except errors.ApiError as exc:
                if exc.code != 404:
                    raise
        rv = str(self.store.resource_version)
        return json_response({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": rv}, "items": deleted})


# -------------------------------------------------------------------- helpers


def _line(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def bookmark(rt: ResourceType, rv: int, initial_events_end: bool = False) -> dict:
    metadata: dict[str, Any] = {"resourceVersion": str(rv)}
    if initial_events_end:
        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": metadata}}


def object_filter(query: dict, name: str | None = None):
    try:
        by_labels = selectors.label_selector(query.get("labelSelector"))
        by_fields = selectors.field_selector(query.get("fieldSelector"))
    except selectors.SelectorError as exc:
        raise errors.bad_request(str(exc)) from exc
    if name is None:
        return lambda obj: by_labels(obj) and by_fields(obj)
    return lambda obj: by_labels(obj) and by_fields(obj) and obj["metadata"].get("name") == name


def watch_event_type(event, namespace: str | None, matches) -> str | None:
    """What a filtered watch reports: an object that stops matching is DELETED for it,
    one that starts matching is ADDED, as the real API server's watch cache does."""
    if namespace is not None and event.obj["metadata"].get("namespace") != namespace:
        return None
    now = matches(event.obj)
    if event.type != "MODIFIED":
        return event.type if now else None
    before = matches(event.old)
    if now and before:
        return "MODIFIED"
    if now:
        return "ADDED"
    return "DELETED" if before else None


def is_dry_run(query: dict) -> bool:
    return query.get("dryRun") == "All"


def require_object(body: Any, rt: ResourceType) -> dict:
    if not isinstance(body, dict):
        raise errors.bad_request(f"expected a {rt.kind} object in the request body")
    kind = body.get("kind")
    if kind and kind != rt.kind and kind not in ("Scale", "DeleteOptions"):
        raise errors.bad_request(f"the body is a {kind}, not a {rt.kind}")
    return body


def patch_function(content_type: str, body: Any):
    if content_type == "application/json-patch+json":
        if not isinstance(body, list):
            raise errors.bad_request("a JSON patch must be a list of operations")
        return _guarded(lambda current: patching.json_patch(current, body))
    if content_type == "application/merge-patch+json":
        return _guarded(lambda current: patching.merge_patch(current, body))
    if content_type == "application/strategic-merge-patch+json":
        return _guarded(lambda current: patching.strategic_merge(current, body))
    raise errors.ApiError(415, f"the patch content type {content_type!r} is not supported", "UnsupportedMediaType")


def _guarded(fn):
    def apply(current: dict) -> dict:
        try:
            result = fn(current)
        except patching.PatchError as exc:
            raise errors.ApiError(422, str(exc), "Invalid") from exc
        if not isinstance(result, dict):
            raise errors.ApiError(422, "the patch did not produce an object", "Invalid")
        return result
    return apply


def to_scale(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0)}}


def _container_state(pod: dict, container: str) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return status.get("state") or {}
    return {}


def container_started(pod: dict, container: str) -> bool:
    state = _container_state(pod, container)
    return "running" in state or "terminated" in state


def container_finished(pod: dict, container: str) -> bool:
    return "terminated" in _container_state(pod, container)


def render_log(chunks, query: dict) -> str:
    if query.get("sinceTime"):
        since = _parse_time(query["sinceTime"])
        chunks = [c for c in chunks if c.time >= since]
    if query.get("sinceSeconds"):
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(query["sinceSeconds"]))
        chunks = [c for c in chunks if c.time >= since]
    lines: list[str] = []
    for chunk in chunks:
        stamp = chunk.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        for line in chunk.text.splitlines(keepends=True):
            lines.append(f"{stamp} {line}" if flag(query, "timestamps") else line)
    if query.get("tailLines"):
        lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) > 0 else []
    text = "".join(lines)
    if query.get("limitBytes"):
        text = text.encode()[:int(query["limitBytes"])].decode(errors="ignore")
    return text


def openapi_v3(path: str) -> dict | None:
    """The OpenAPI v3 index and per-group-version documents without schemas: each resource
    gets a PATCH operation that declares the `fieldValidation` query parameter, which is
    what kubectl looks for before it validates manifests server-side."""
    if path.rstrip("/") == "/openapi/v3":
        paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=sandbox"}}
        for group, versions in catalog.groups().items():
            for version in versions:
                paths[f"apis/{group}/{version}"] = {
                    "serverRelativeURL": f"/openapi/v3/apis/{group}/{version}?hash=sandbox"}
        return {"paths": paths}
    parts = path.rstrip("/").split("/")[3:]
    group, version = ("", parts[1]) if parts[:1] == ["api"] and len(parts) == 2 else (
        (parts[1], parts[2]) if parts[:1] == ["apis"] and len(parts) == 3 else (None, None))
    served = [rt for rt in catalog.RESOURCE_TYPES if rt.group == group and rt.version == version]
    if not served:
        return None
    # only what can be patched has a PATCH operation (kubernetes/kube-openapi builds the paths from the verbs each
    # resource serves): kubectl reads these for server-side apply, and a create-only review has none
    served = [rt for rt in served if "patch" in rt.verbs]
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.35.0"},
            "paths": {_item_path(rt): {"patch": _patch_operation(rt)} for rt in served},
            "components": {"schemas": {}}}


def _item_path(rt: ResourceType) -> str:
    prefix = f"/apis/{rt.group}/{rt.version}" if rt.group else "/api/v1"
    scope = "/namespaces/{namespace}" if rt.namespaced else ""
    return f"{prefix}{scope}/{rt.plural}/{{name}}"


def _patch_operation(rt: ResourceType) -> dict:
    query_params = ("dryRun", "fieldManager", "fieldValidation", "force")
    return {"operationId": f"patch{rt.kind}", "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
            "parameters": [{"name": name, "in": "query", "schema": {"type": "string"}} for name in query_params],
            "responses": {"200": {"description": "OK"}}}
