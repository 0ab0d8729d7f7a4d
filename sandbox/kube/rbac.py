"""Authentication and RBAC authorization for the emulator, as strict as a real API server.

A request without an `Authorization` header is the sandbox's admin (the kubeconfig the
tests and `make demo` use has no credentials) and may do anything, as a member of
`system:masters` may. A request with `Authorization: Bearer <token>` is the
ServiceAccount the token was minted for (TokenRequest, `mint_token`); any other
credential answers 401. A ServiceAccount is authorized by the Roles, ClusterRoles,
RoleBindings and ClusterRoleBindings in the store plus the bootstrap ClusterRoles
seeded at start (`system:discovery`, `system:basic-user`, `system:public-info-viewer`, and
`view` with the rules it aggregates), and a refusal is the real 403 Status.

Sources (kubernetes/kubernetes, v1.35):
- staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go: verb, resource,
  subresource, name and namespace of a request (`request_attributes`)
- plugin/pkg/auth/authorizer/rbac/rbac.go `RuleAllows`, pkg/apis/rbac/v1/evaluation_helpers.go:
  how one rule matches (`rule_allows`)
- pkg/registry/rbac/validation/rule.go `VisitRulesFor`, `appliesToUser`: which bindings apply
- plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go: the discovery roles; `view`, whose
  aggregationRule selects `rbac.authorization.k8s.io/aggregate-to-view: "true"`, i.e.
  `system:aggregate-to-view` (read Pods, Jobs, ... and no Secrets; rules as at 53f1b9d, unchanged since in
  what a build touches); the aggregation controller's result is seeded, as the emulator runs no such
  controller
- staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go `forbiddenMessage`
  and staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go `NewForbidden`: the 403 text
- staging/src/k8s.io/apiserver/pkg/endpoints/filters/authentication.go `Unauthorized`: the 401
- staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go: a server-side apply that
  creates the object is authorized again as `create` (`withAuthorization`)
- pkg/apis/authentication/validation/validation.go `ValidateTokenRequest`: 10 minutes at least
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import pathlib
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import yaml

from . import catalog, errors, exec_credential

if TYPE_CHECKING:
    from .store import ObjectStore

RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"
APPLY_CONTENT_TYPES = ("application/apply-patch+yaml", "application/apply-patch+cbor")
NAMESPACE_SUBRESOURCES = {"status", "finalize"}
SPECIAL_VERBS = {"proxy", "watch"}
SPECIAL_VERBS_NO_SUBRESOURCES = {"proxy"}
DEFAULT_TOKEN_SECONDS = 3600
MIN_TOKEN_SECONDS = 600


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return MASTERS in self.groups


ADMIN = User("kubernetes-admin", (MASTERS, "system:authenticated"))


def service_account_user(namespace: str, name: str) -> User:
    """The user a ServiceAccount token authenticates as (k8s.io/apiserver/pkg/authentication/serviceaccount)."""
    return User(f"system:serviceaccount:{namespace}:{name}",
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"))


@dataclass
class Attributes:
    """authorizer.Attributes of one request, as requestinfo.go derives them."""

    user: User
    verb: str
    path: str
    resource_request: bool = False
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def _watch_value(query: list[tuple[str, str]]) -> bool | None:
    """`watch` as ListOptions decodes it: any value but `0` and `false` is true."""
    values = [v for k, v in query if k == "watch"]
    if not values:
        return None
    return values[0].lower() not in ("false", "0")


def _exact_name(field_selector: str) -> str | None:
    """The name a `metadata.name=x` (or `==`) term requires, as fields.Selector.RequiresExactMatch."""
    for term in field_selector.split(","):
        for operator in ("==", "="):
            key, sep, value = term.partition(operator)
            if sep and not key.endswith("!") and key.strip() == "metadata.name":
                return value.strip()
    return None


def request_attributes(user: User, method: str, path: str, query_string: str) -> Attributes:
    verb = method.lower()
    attrs = Attributes(user=user, verb=verb, path=path)
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return attrs
    prefix, parts = parts[0], parts[1:]
    if prefix == "apis":
        if len(parts) < 3:
            return attrs
        attrs.api_group, parts = parts[0], parts[1:]
    attrs.resource_request = True
    parts = parts[1:]  # the version
    if parts[0] in SPECIAL_VERBS:
        if len(parts) < 2:
            return attrs
        attrs.verb, parts = parts[0], parts[1:]
    else:
        attrs.verb = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
                      "DELETE": "delete"}.get(method.upper(), "")
    if parts[0] == "namespaces":
        if len(parts) > 1:
            attrs.namespace = parts[1]
            if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
                parts = parts[2:]
    if len(parts) >= 3 and attrs.verb not in SPECIAL_VERBS_NO_SUBRESOURCES:
        attrs.subresource = parts[2]
    if len(parts) >= 2:
        attrs.name = parts[1]
    attrs.resource = parts[0]
    query = parse_qsl(query_string, keep_blank_values=True)
    if not attrs.name and attrs.verb == "get":
        attrs.verb = "watch" if _watch_value(query) else "list"
        selector = next((v for k, v in query if k == "fieldSelector"), None)
        name = _exact_name(selector) if selector else None
        if name and "/" not in name and name not in (".", ".."):
            attrs.name = name
    if not attrs.name and attrs.verb == "delete":
        attrs.verb = "deletecollection"
    return attrs


# ---------------------------------------------------------------- rules


def _has(values: list[str] | None, wanted: str) -> bool:
    return "*" in (values or []) or wanted in (values or [])


def rule_allows(attrs: Attributes, rule: dict) -> bool:
    """plugin/pkg/auth/authorizer/rbac/rbac.go RuleAllows with pkg/apis/rbac/v1/evaluation_helpers.go."""
    if not _has(rule.get("verbs"), attrs.verb):
        return False
    if not attrs.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1])):
                return True
        return False
    if not _has(rule.get("apiGroups"), attrs.api_group):
        return False
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    resources = rule.get("resources") or []
    if not ("*" in resources or combined in resources
            or (attrs.subresource and f"*/{attrs.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def _applies_to(user: User, subject: dict, binding_namespace: str) -> bool:
    """pkg/registry/rbac/validation/rule.go appliesToUser."""
    kind = subject.get("kind")
    if kind == "User":
        return subject.get("name") == user.name
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{subject.get('name')}"
    return False


class Authorizer:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _role_rules(self, ref: dict, binding_namespace: str) -> tuple[list[dict], str | None]:
        kind, name = ref.get("kind"), ref.get("name", "")
        if kind == "ClusterRole":
            role = self.store.find("clusterroles", None, name)
            missing = f'clusterrole.{RBAC_GROUP} "{name}" not found'
        else:
            role = self.store.find("roles", binding_namespace, name)
            missing = f'role.{RBAC_GROUP} "{name}" not found'
        if role is None:
            return [], missing
        return role.get("rules") or [], None

    def rules_for(self, user: User, namespace: str):
        """(rules, errors) in VisitRulesFor's order: ClusterRoleBindings, then the namespace's RoleBindings."""
        for rules, problem, _ in self._visit(user, namespace):
            yield rules, problem

    def _visit(self, user: User, namespace: str):
        """(rules, error, source) per binding that applies; the source as rule.go's binding describers word it."""
        bindings = [(b, "") for b in self.store.list("clusterrolebindings")[0]]
        if namespace:
            bindings += [(b, namespace) for b in self.store.list("rolebindings", namespace)[0]]
        for binding, binding_namespace in bindings:
            subject = next((s for s in binding.get("subjects") or [] if _applies_to(user, s, binding_namespace)), None)
            if subject is not None:
                ref = binding.get("roleRef") or {}
                yield (*self._role_rules(ref, binding_namespace), _describe(binding, ref, subject, binding_namespace))

    def authorize(self, attrs: Attributes) -> tuple[bool, str]:
        """(allowed, reason): `RBAC: allowed by <binding>` when allowed (rbac.go authorizingVisitor.visit), else
        the roles a binding refers to that do not exist; system:masters is allowed with no reason, as the
        privileged-group authorizer answers (k8s.io/apiserver pkg/authorization/authorizerfactory/builtin.go)."""
        if attrs.user.is_admin:
            return True, ""
        problems = []
        for rules, problem, source in self._visit(attrs.user, attrs.namespace):
            if any(rule_allows(attrs, rule) for rule in rules):
                return True, f"RBAC: allowed by {source}"
            if problem:
                problems.append(problem)
        if not problems:
            return False, ""
        return False, "RBAC: " + (problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]")


def _go_quote(text: str) -> str:
    """Go's %q for the names RBAC allows (DNS subdomains and the like: nothing to escape)."""
    return json.dumps(text)


def _describe(binding: dict, ref: dict, subject: dict, binding_namespace: str) -> str:
    """pkg/registry/rbac/validation/rule.go clusterRoleBindingDescriber / roleBindingDescriber and describeSubject
    (kubernetes/kubernetes v1.35)."""
    kind, name = subject.get("kind", ""), subject.get("name", "")
    if kind == "ServiceAccount":
        who = f"{kind} {_go_quote(name + '/' + (subject.get('namespace') or binding_namespace))}"
    else:
        who = f"{kind} {_go_quote(name)}"
    role = f"{ref.get('kind', '')} {_go_quote(ref.get('name', ''))}"
    if binding_namespace:
        return f"RoleBinding {_go_quote(binding['metadata']['name'] + '/' + binding_namespace)} of {role} to {who}"
    return f"ClusterRoleBinding {_go_quote(binding['metadata']['name'])} of {role} to {who}"


# ---------------------------------------------------------------- SelfSubjectAccessReview
#
# kubernetes/kubernetes pkg/registry/authorization/selfsubjectaccessreview/rest.go (v1.35) `Create`: the spec is
# validated (pkg/apis/authorization/validation/validation.go ValidateSelfSubjectAccessReview: exactly one of
# resourceAttributes and nonResourceAttributes, metadata empty), the attributes are built for the requesting user
# (pkg/registry/authorization/util/helpers.go ResourceAttributesFrom / NonResourceAttributesFrom) and the
# authorizer's decision is the status: allowed (DecisionAllow), denied (DecisionDeny: RBAC never denies, it has no
# opinion), reason. The review is answered with 201 and never stored.

REVIEW_KIND = "SelfSubjectAccessReview"
REVIEW_GROUP = "authorization.k8s.io"


def _invalid_review(field_path: str, value: str, detail: str) -> errors.ApiError:
    """apierrors.NewInvalid(Kind("SelfSubjectAccessReview"), "", errs): field.Invalid's `<path>: Invalid value:
    <value>: <detail>`."""
    return errors.ApiError(422, f'{REVIEW_KIND}.{REVIEW_GROUP} "" is invalid: {field_path}: Invalid value: '
                                f"{value}: {detail}", "Invalid",
                           {"group": REVIEW_GROUP, "kind": REVIEW_KIND,
                            "causes": [{"reason": "FieldValueInvalid", "message": f"Invalid value: {value}: {detail}",
                                        "field": field_path}]})


def review_attributes(user: User, body: dict | None) -> Attributes:
    if not isinstance(body, dict) or body.get("kind") not in (None, REVIEW_KIND):
        raise errors.bad_request(f"not a {REVIEW_KIND}")
    spec = body.get("spec") or {}
    resource, non_resource = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if resource is not None and non_resource is not None:
        raise _invalid_review("spec.nonResourceAttributes", json.dumps(non_resource),
                              "cannot be specified in combination with resourceAttributes")
    if resource is None and non_resource is None:
        raise _invalid_review("spec.resourceAttributes", "null",
                              "exactly one of nonResourceAttributes or resourceAttributes must be specified")
    metadata = {k: v for k, v in (body.get("metadata") or {}).items()
                if k != "managedFields" and v not in (None, "", {}, [])}
    if metadata:
        raise _invalid_review("metadata", json.dumps(metadata), "must be empty")
    if resource is not None:
        return Attributes(user=user, verb=resource.get("verb") or "", path="", resource_request=True,
                          api_group=resource.get("group") or "", resource=resource.get("resource") or "",
                          subresource=resource.get("subresource") or "", namespace=resource.get("namespace") or "",
                          name=resource.get("name") or "")
    return Attributes(user=user, verb=non_resource.get("verb") or "", path=non_resource.get("path") or "")


def forbidden(attrs: Attributes, reason: str) -> errors.ApiError:
    """responsewriters.Forbidden: forbiddenMessage wrapped by apierrors.NewForbidden."""
    user = attrs.user.name
    if not attrs.resource_request:
        message = f'User "{user}" cannot {attrs.verb} path "{attrs.path}"'
    else:
        resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
        message = f'User "{user}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.api_group}" {scope}'
    if reason:
        message = f"{message}: {reason}"
    return _forbidden_status(attrs, message)


def _forbidden_status(attrs: Attributes, text: str) -> errors.ApiError:
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    if not attrs.resource:
        message = f"forbidden: {text}"
    elif not attrs.name:
        message = f"{qualified} is forbidden: {text}"
    else:
        message = f'{qualified} "{attrs.name}" is forbidden: {text}'
    return errors.ApiError(403, message, "Forbidden",
                           {"name": attrs.name, "group": attrs.api_group, "kind": attrs.resource})


# ---------------------------------------------------------------- escalation prevention
#
# kubernetes/kubernetes pkg/registry/rbac/role/policybased/storage.go, clusterrole/policybased/storage.go,
# rolebinding/policybased/storage.go, clusterrolebinding/policybased/storage.go (read at 04791b4):
# a Role or ClusterRole is created or updated only by system:masters, by a user allowed to `escalate` it
# (pkg/registry/rbac/escalation_check.go RoleEscalationAuthorized), or by one who holds every permission in it
# (pkg/registry/rbac/validation/rule.go ConfirmNoEscalation, staging/src/k8s.io/component-helpers/auth/rbac/
# validation/policy_comparator.go Covers); a RoleBinding or ClusterRoleBinding needs `bind` on the role it refers
# to (BindingAuthorized) or every permission of that role. A refusal is apierrors.NewForbidden with the
# ConfirmNoEscalation text; a binding to a role that does not exist answers the role's 404.

ESCALATION_GUARDED = {"roles", "clusterroles", "rolebindings", "clusterrolebindings"}


def _breakdown(rule: dict) -> list[dict]:
    """policy_comparator.go BreakdownRule: one verb, one resource, one resource name per rule."""
    subrules = []
    for group in rule.get("apiGroups") or []:
        for resource in rule.get("resources") or []:
            for verb in rule.get("verbs") or []:
                names = rule.get("resourceNames") or []
                base = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
                subrules += [{**base, "resourceNames": [n]} for n in names] if names else [base]
    for url in rule.get("nonResourceURLs") or []:
        for verb in rule.get("verbs") or []:
            subrules.append({"nonResourceURLs": [url], "verbs": [verb]})
    return subrules


def _resources_cover(owned: list[str], wanted: list[str]) -> bool:
    if "*" in owned or set(wanted) <= set(owned):
        return True
    for path in wanted:
        if path in owned:
            continue
        if "/" not in path or f"*/{path.split('/', 1)[1]}" not in owned:
            return False
    return True


def _urls_cover(owned: list[str], wanted: list[str]) -> bool:
    return all(any(o == p or (o.endswith("*") and p.startswith(o.rstrip("*"))) for o in owned) for p in wanted)


def _rule_covers(owner: dict, sub: dict) -> bool:
    """policy_comparator.go ruleCovers."""
    verbs, groups = owner.get("verbs") or [], owner.get("apiGroups") or []
    owner_names, sub_names = owner.get("resourceNames") or [], sub.get("resourceNames") or []
    names = not owner_names if not sub_names else (not owner_names or set(sub_names) <= set(owner_names))
    return (("*" in verbs or set(sub.get("verbs") or []) <= set(verbs))
            and ("*" in groups or set(sub.get("apiGroups") or []) <= set(groups))
            and _resources_cover(owner.get("resources") or [], sub.get("resources") or [])
            and _urls_cover(owner.get("nonResourceURLs") or [], sub.get("nonResourceURLs") or [])
            and names)


def uncovered(owner_rules: list[dict], rules: list[dict]) -> list[dict]:
    """policy_comparator.go Covers: the broken-down rules no owner rule covers."""
    return [sub for rule in rules for sub in _breakdown(rule) if not any(_rule_covers(o, sub) for o in owner_rules)]


def _compact(rules: list[dict]) -> list[dict]:
    """pkg/registry/rbac/validation/policy_compact.go CompactRules: single group/resource rules merge their verbs."""
    compacted, simple = [], {}
    for rule in rules:
        if set(rule) == {"apiGroups", "resources", "verbs"} and len(rule["apiGroups"]) == len(rule["resources"]) == 1:
            key = (rule["apiGroups"][0], rule["resources"][0])
            if key in simple:
                simple[key]["verbs"] = simple[key]["verbs"] + rule["verbs"]
            else:
                simple[key] = {**rule, "verbs": list(rule["verbs"])}
        else:
            compacted.append(rule)
    return compacted + list(simple.values())


def _go_quoted(values: list[str]) -> str:
    """fmt's %q of a []string: `["a" "b"]`."""
    return "[" + " ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def compact_string(rule: dict) -> str:
    """pkg/apis/rbac/v1/evaluation_helpers.go CompactString."""
    parts = [f"{label}:{_go_quoted(rule[key])}" for key, label in (
        ("apiGroups", "APIGroups"), ("resources", "Resources"), ("nonResourceURLs", "NonResourceURLs"),
        ("resourceNames", "ResourceNames"), ("verbs", "Verbs")) if rule.get(key)]
    return "{" + ", ".join(parts) + "}"


class EscalationCheck:
    """The policybased storages' checks for one user; `check(obj, old)` raises the API server's refusal."""

    def __init__(self, authorizer: Authorizer, user: User, plural: str, namespace: str, name: str) -> None:
        self.authorizer, self.user, self.plural = authorizer, user, plural
        self.namespace, self.name = namespace, name

    def _allowed(self, verb: str, resource: str, name: str, api_group: str = RBAC_GROUP) -> bool:
        attrs = Attributes(user=self.user, verb=verb, path="", resource_request=True, api_group=api_group,
                           resource=resource, namespace=self.namespace, name=name)
        return self.authorizer.authorize(attrs)[0]

    def confirm_no_escalation(self, rules: list[dict], object_name: str) -> None:
        """rule.go ConfirmNoEscalation, wrapped in apierrors.NewForbidden by the storage."""
        owner_rules, problems = [], []
        for found, problem in self.authorizer.rules_for(self.user, self.namespace):
            owner_rules += found
            if problem:
                problems.append(problem)
        missing = uncovered(owner_rules, rules)
        if not missing:
            return
        descriptions = sorted({compact_string(rule) for rule in _compact(missing)})
        message = (f'user "{self.user.name}" (groups={_go_quoted(list(self.user.groups))}) is attempting to grant '
                   "RBAC permissions not currently held:\n" + "\n".join(descriptions))
        if problems:
            message += "; resolution errors: [" + (problems[0] if len(problems) == 1
                                                   else "[" + ", ".join(problems) + "]") + "]"
        rt = catalog.BY_PLURAL[self.plural]
        raise errors.ApiError(403, f'{rt.qualified_name} "{object_name}" is forbidden: {message}', "Forbidden",
                              {"name": object_name, "group": RBAC_GROUP, "kind": self.plural})

    def check(self, obj: dict, old: dict | None = None) -> None:
        name = (obj.get("metadata") or {}).get("name") or self.name
        if self.plural in ("roles", "clusterroles"):
            if not self._allowed("escalate", self.plural, self.name):
                self.confirm_no_escalation(obj.get("rules") or [], name)
            return
        if old is not None and _only_gc_fields_change(obj, old):
            return
        ref = obj.get("roleRef") or {}
        kind, role_name = ref.get("kind"), ref.get("name", "")
        if kind in ("Role", "ClusterRole") and self._allowed(
                "bind", "roles" if kind == "Role" else "clusterroles", role_name, ref.get("apiGroup", "")):
            return
        if kind == "Role":
            role = self.authorizer.store.find("roles", self.namespace, role_name)
        elif kind == "ClusterRole":
            role = self.authorizer.store.find("clusterroles", None, role_name)
        else:
            raise errors.ApiError(500, f'unsupported role reference kind: "{kind}"', "Unknown")
        if role is None:
            raise errors.not_found(catalog.BY_PLURAL["roles" if kind == "Role" else "clusterroles"], role_name)
        self.confirm_no_escalation(role.get("rules") or [], name)


def _only_gc_fields_change(obj: dict, old: dict) -> bool:
    """pkg/registry/rbac/helpers.go IsOnlyMutatingGCFields: only ownerReferences or finalizers differ."""
    def without_gc(o: dict) -> dict:
        meta = {k: v for k, v in (o.get("metadata") or {}).items()
                if k not in ("ownerReferences", "finalizers", "resourceVersion", "managedFields")}
        return {**o, "metadata": meta}
    return without_gc(obj) == without_gc(old)


# ---------------------------------------------------------------- tokens


@dataclass
class Token:
    namespace: str
    service_account: str
    uid: str
    expires: float
    audiences: list[str] = field(default_factory=list)


@dataclass
class ExecTokenUse:
    """One token of the exec plugin as the emulator met it: never the token itself, only its fingerprint."""

    fingerprint: str
    principal: str
    client: str
    expires: float
    outcome: str  # "accepted" (its first accepted request), "expired", "revoked", "no access entry"
    time: float = field(default_factory=time.time)


class ExecTokens:
    """Tokens of the sandbox's `aws eks get-token` (sandbox/kube/exec_credential.py), authenticated as EKS does
    (kubernetes-sigs/aws-iam-authenticator pkg/token/token.go: 15 minutes after X-Amz-Date; a refused token gets
    kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/filters/authentication.go's 401 Unauthorized).

    The token proves an IAM principal until its lifetime has passed by the server's clock
    (kubernetes-sigs/aws-iam-authenticator pkg/token/token.go: 15 minutes after X-Amz-Date); an access entry maps
    the principal to a username and Kubernetes groups (EKS CreateAccessEntry `username`, `kubernetesGroups`),
    which RBAC binds like any user. An expired token, one of a principal without an access entry, or one
    issued before `revoke` answers 401 Unauthorized. `uses` records each token's first accepted request and
    every refusal.
    """

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)
        self.uses: list[ExecTokenUse] = []
        self._entries: dict[str, User] = {}
        self._accepted: set[str] = set()
        self._revoked_before = 0.0
        self._lock = threading.Lock()

    def add_access_entry(self, principal: str, username: str, groups: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._entries[principal] = User(username, (*groups, "system:authenticated"))

    def revoke(self) -> None:
        """Every token issued so far is refused from now on: what STS does to a GetCallerIdentity signed with
        role-session credentials issued before the role's sessions were revoked (IAM `aws:TokenIssueTime`), and
        what a client meets when the server's clock is ahead of its own. The plugin's next token works."""
        with self._lock:
            self._revoked_before = time.time()

    def recorded(self) -> list[ExecTokenUse]:
        with self._lock:
            return list(self.uses)

    def authenticate(self, token: str, client: str) -> User | None:
        try:
            principal, issued, expires = exec_credential.verify(self.key, token)
        except exec_credential.InvalidToken:
            return None
        fingerprint = hashlib.sha256(token.encode()).hexdigest()[:16]
        with self._lock:
            user = self._entries.get(principal)
            if time.time() >= expires:
                outcome = "expired"
            elif issued <= self._revoked_before:
                outcome = "revoked"
            elif user is None:
                outcome = "no access entry"
            elif fingerprint in self._accepted:
                return user
            else:
                outcome = "accepted"
                self._accepted.add(fingerprint)
            self.uses.append(ExecTokenUse(fingerprint, principal, client, expires, outcome))
        return user if outcome == "accepted" else None


class Authenticator:
    """Bearer tokens minted by TokenRequest, bound to the ServiceAccount's uid: a token of a deleted (or
    recreated) ServiceAccount, or an expired one, answers 401 like the real server; and the exec plugin's
    tokens (`ExecTokens`)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._tokens: dict[str, Token] = {}
        self._lock = threading.Lock()
        self.exec_tokens = ExecTokens()

    def mint(self, namespace: str, name: str, expiration_seconds: int = DEFAULT_TOKEN_SECONDS,
             audiences: list[str] | None = None) -> tuple[str, Token]:
        account = self.store.get("serviceaccounts", namespace, name)
        token = Token(namespace, name, account["metadata"]["uid"], time.time() + expiration_seconds,
                      audiences or ["https://kubernetes.default.svc"])
        value = "sandbox." + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[value] = token
        return value, token

    def authenticate(self, authorization: str | None, client: str = "") -> User | None:
        """The user, ADMIN without credentials, None when the credentials are not valid."""
        if not authorization:
            return ADMIN
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        if value.strip().startswith(exec_credential.PREFIX):
            return self.exec_tokens.authenticate(value.strip(), client)
        with self._lock:
            token = self._tokens.get(value.strip())
        if token is None or token.expires < time.time():
            return None
        account = self.store.find("serviceaccounts", token.namespace, token.service_account)
        if account is None or account["metadata"].get("uid") != token.uid:
            return None
        return service_account_user(token.namespace, token.service_account)


def unauthorized() -> errors.ApiError:
    return errors.ApiError(401, "Unauthorized", "Unauthorized")


class Rbac:
    """The emulator's authentication and authorization, one hook per request."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.authenticator = Authenticator(store)
        self.authorizer = Authorizer(store)

    def check(self, method: str, path: str, query_string: str, headers) -> tuple[User | None, errors.ApiError | None]:
        user = self.authenticator.authenticate(headers.get("Authorization"), headers.get("User-Agent", ""))
        if user is None:
            return None, unauthorized()
        attrs = request_attributes(user, method, path, query_string)
        allowed, reason = self.authorizer.authorize(attrs)
        if not allowed:
            return user, forbidden(attrs, reason)
        if self._creates_by_apply(attrs, headers.get("Content-Type", "")):
            attrs.verb = "create"
            allowed, reason = self.authorizer.authorize(attrs)
            if not allowed:
                return user, _forbidden_status(attrs, reason)
        return user, None

    def escalation_check(self, user: User | None, plural: str, group: str, namespace: str | None,
                         name: str | None, verb: str) -> EscalationCheck | None:
        """The escalation check a write of a Role, ClusterRole or binding needs; None when none applies."""
        if (user is None or user.is_admin or group != RBAC_GROUP or plural not in ESCALATION_GUARDED
                or verb not in ("create", "update", "patch")):
            return None
        return EscalationCheck(self.authorizer, user, plural, namespace or "", name or "")

    def _creates_by_apply(self, attrs: Attributes, content_type: str) -> bool:
        """A server-side apply of an object that does not exist yet (handlers/patch.go, withAuthorization)."""
        if attrs.user.is_admin or attrs.verb != "patch" or attrs.subresource or not attrs.name:
            return False
        if content_type.split(";")[0].strip() not in APPLY_CONTENT_TYPES:
            return False
        rt = catalog.BY_PLURAL.get(attrs.resource)
        if rt is None or rt.group != attrs.api_group:
            return False
        return self.store.find(rt.plural, attrs.namespace or None, attrs.name) is None

    def self_subject_access_review(self, user: User, body: dict | None) -> dict:
        """POST selfsubjectaccessreviews: may the requesting user do what the spec names (see `review_attributes`)."""
        allowed, reason = self.authorizer.authorize(review_attributes(user, body))
        status = {"allowed": allowed}
        if reason:
            status["reason"] = reason
        return {"kind": REVIEW_KIND, "apiVersion": f"{REVIEW_GROUP}/v1", "metadata": {},
                "spec": (body or {}).get("spec") or {}, "status": status}

    def token_request(self, namespace: str, name: str, body: dict | None) -> dict:
        """POST serviceaccounts/<name>/token: a TokenRequest with a fresh token."""
        spec = (body or {}).get("spec") or {}
        seconds = int(spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS)
        if seconds < MIN_TOKEN_SECONDS:
            raise errors.ApiError(
                422, f'TokenRequest.authentication.k8s.io "{(body or {}).get("metadata", {}).get("name", "")}" '
                     f"is invalid: spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration "
                     "less than 10 minutes", "Invalid")
        value, token = self.authenticator.mint(namespace, name, seconds, spec.get("audiences"))
        expires = datetime.datetime.fromtimestamp(token.expires, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace,
                             "creationTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
                "spec": {"audiences": token.audiences, "expirationSeconds": seconds, "boundObjectRef": None},
                "status": {"token": value, "expirationTimestamp": expires}}


# ---------------------------------------------------------------- bootstrap policy


def _cluster_role(name: str, rules: list[dict]) -> dict:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                         "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "rules": rules}


def _cluster_binding(name: str, groups: list[str]) -> dict:
    return {"apiVersion": f"{RBAC_GROUP}/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                         "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups]}


READ = ["get", "list", "watch"]
AGGREGATE_TO_VIEW = [
    {"apiGroups": [""], "verbs": READ, "resources": [
        "pods", "replicationcontrollers", "replicationcontrollers/scale", "serviceaccounts", "services",
        "services/status", "endpoints", "persistentvolumeclaims", "persistentvolumeclaims/status", "configmaps"]},
    {"apiGroups": [""], "verbs": READ, "resources": [
        "limitranges", "resourcequotas", "bindings", "events", "pods/status", "resourcequotas/status",
        "namespaces/status", "replicationcontrollers/status", "pods/log"]},
    {"apiGroups": [""], "verbs": READ, "resources": ["namespaces"]},
    {"apiGroups": ["apps"], "verbs": READ, "resources": [
        "controllerrevisions", "statefulsets", "statefulsets/status", "statefulsets/scale", "daemonsets",
        "daemonsets/status", "deployments", "deployments/status", "deployments/scale", "replicasets",
        "replicasets/status", "replicasets/scale"]},
    {"apiGroups": ["autoscaling"], "verbs": READ,
     "resources": ["horizontalpodautoscalers", "horizontalpodautoscalers/status"]},
    {"apiGroups": ["batch"], "verbs": READ, "resources": ["jobs", "cronjobs", "cronjobs/status", "jobs/status"]},
    {"apiGroups": ["extensions"], "verbs": READ, "resources": [
        "daemonsets", "daemonsets/status", "deployments", "deployments/scale", "deployments/status", "ingresses",
        "ingresses/status", "replicasets", "replicasets/scale", "replicasets/status",
        "replicationcontrollers/scale", "networkpolicies"]},
    {"apiGroups": ["policy"], "verbs": READ, "resources": ["poddisruptionbudgets", "poddisruptionbudgets/status"]},
    {"apiGroups": ["networking.k8s.io"], "verbs": READ,
     "resources": ["networkpolicies", "ingresses", "ingresses/status"]},
]


def _view_roles() -> list[dict]:
    """`system:aggregate-to-view` and `view` as the ClusterRole aggregation controller leaves it (kubernetes/kubernetes
    plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go: no Secrets in `view`)."""
    aggregated = _cluster_role("system:aggregate-to-view", AGGREGATE_TO_VIEW)
    aggregated["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] = "true"
    view = _cluster_role("view", AGGREGATE_TO_VIEW)
    view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] = "true"
    view["aggregationRule"] = {"clusterRoleSelectors": [
        {"matchLabels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}}]}
    return [aggregated, view]


def bootstrap_policy() -> tuple[list[dict], list[dict]]:
    """The bootstrap ClusterRoles and ClusterRoleBindings this emulator serves (bootstrappolicy/policy.go)."""
    health = ["/livez", "/readyz", "/healthz", "/version", "/version/"]
    roles = [
        _cluster_role("cluster-admin", [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                                        {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        _cluster_role("system:discovery", [{"nonResourceURLs": [*health, "/openapi", "/openapi/*", "/api", "/api/*",
                                                                "/apis", "/apis/*"], "verbs": ["get"]}]),
        _cluster_role("system:basic-user", [{"apiGroups": ["authorization.k8s.io"],
                                             "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                                             "verbs": ["create"]}]),
        _cluster_role("system:public-info-viewer", [{"nonResourceURLs": health, "verbs": ["get"]}]),
        *_view_roles(),
    ]
    bindings = [
        _cluster_binding("cluster-admin", [MASTERS]),
        _cluster_binding("system:discovery", ["system:authenticated"]),
        _cluster_binding("system:basic-user", ["system:authenticated"]),
        _cluster_binding("system:public-info-viewer", ["system:authenticated", "system:unauthenticated"]),
    ]
    return roles, bindings


def seed(store: ObjectStore) -> None:
    roles, bindings = bootstrap_policy()
    for role in roles:
        store.create("clusterroles", None, role)
    for binding in bindings:
        store.create("clusterrolebindings", None, binding)


# ---------------------------------------------------------------- kubeconfig


def write_service_account_kubeconfig(rbac: Rbac, server: str, ca_pem: bytes, path: str | os.PathLike,
                                     namespace: str, name: str,
                                     expiration_seconds: int = DEFAULT_TOKEN_SECONDS) -> pathlib.Path:
    """A kubeconfig that authenticates as the ServiceAccount with a freshly minted token, 0600."""
    token, _ = rbac.authenticator.mint(namespace, name, expiration_seconds)
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "sandbox", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "sandbox", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def write_exec_kubeconfig(rbac: Rbac, server: str, ca_pem: bytes, path: str | os.PathLike, principal: str,
                          lifetime_seconds: float) -> pathlib.Path:
    """A kubeconfig whose user runs the sandbox's exec plugin, as the one `aws eks update-kubeconfig` writes runs
    `aws eks get-token` (aws/aws-cli awscli/customizations/eks/update_kubeconfig.py, v2); the plugin's signing key in
    a file beside it, both 0600."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key_file = path.with_name(path.name + ".key")
    key_file.write_bytes(rbac.authenticator.exec_tokens.key)
    key_file.chmod(0o600)
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "sandbox", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": principal, "user": {"exec": {
            "apiVersion": exec_credential.V1, "command": sys.executable,
            "args": [exec_credential.__file__, "--principal", principal, "--lifetime-seconds", str(lifetime_seconds),
                     "--key-file", str(key_file)],
            "interactiveMode": "Never", "provideClusterInfo": False}}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": principal}}],
        "current-context": "sandbox",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
