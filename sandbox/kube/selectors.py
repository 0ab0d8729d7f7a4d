"""Label and field selectors in the query-string syntax of the Kubernetes API."""

from __future__ import annotations

import re
from collections.abc import Callable

Predicate = Callable[[dict], bool]

_SET_EXPR = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


class SelectorError(ValueError):
    pass


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside `in (a,b)` parentheses."""
    terms, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _label_term(term: str) -> Callable[[dict[str, str]], bool]:
    if match := _SET_EXPR.match(term):
        key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in term:
            key, value = (part.strip() for part in term.split(op, 1))
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    if term.startswith("!"):
        key = term[1:].strip()
        return lambda labels: key not in labels
    return lambda labels: term in labels


def label_selector(selector: str | None) -> Predicate:
    if not selector:
        return lambda obj: True
    checks = [_label_term(term) for term in _split_terms(selector)]

    def matches(obj: dict) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)
    return matches


def match_labels(selector: dict | None, labels: dict | None) -> bool:
    """A structured LabelSelector (matchLabels/matchExpressions) against a label map."""
    selector, labels = selector or {}, labels or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def field_value(obj: dict, path: str) -> str:
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_selector(selector: str | None) -> Predicate:
    """Any dotted path is accepted (the real server allows only a few per resource)."""
    if not selector:
        return lambda obj: True
    checks: list[Predicate] = []
    for term in _split_terms(selector):
        negate = "!=" in term
        op = "!=" if negate else ("==" if "==" in term else "=")
        if op not in term:
            raise SelectorError(f"invalid field selector term {term!r}")
        path, expected = (part.strip() for part in term.split(op, 1))
        checks.append(lambda obj, p=path, e=expected, n=negate: (field_value(obj, p) == e) != n)
    return lambda obj: all(check(obj) for check in checks)
