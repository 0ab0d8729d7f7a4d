"""API errors carried as Kubernetes `Status` objects."""

from __future__ import annotations

from http import HTTPStatus

from .catalog import ResourceType

REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    406: "NotAcceptable", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
    429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


def reason_for(code: int) -> str:
    if code in REASONS:
        return REASONS[code]
    try:
        return HTTPStatus(code).phrase.replace(" ", "")
    except ValueError:
        return "Unknown"


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or reason_for(code)
        self.details = details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> dict:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rt.qualified_name} "{name}" not found', "NotFound", _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'{rt.qualified_name} "{name}" already exists', "AlreadyExists", _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'Operation cannot be fulfilled on {rt.qualified_name} "{name}": the object has been '
                         "modified; please apply your changes to the latest version and try again",
                    "Conflict", _details(rt, name))


def invalid(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(422, f'{rt.kind} "{name}" is invalid: {why}', "Invalid", _details(rt, name))


def gone(message: str = "too old resource version") -> ApiError:
    return ApiError(410, message, "Expired")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "BadRequest")


def injected(code: int) -> ApiError:
    return ApiError(code, f"fault injected by the sandbox emulator (HTTP {code})")
