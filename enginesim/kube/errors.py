"""Kubernetes API errors as ``Status`` objects (``kind: Status``, ``apiVersion: v1``)."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "already_exists",
    "bad_request",
    "conflict",
    "gone",
    "internal_error",
    "method_not_allowed",
    "not_found",
    "status_object",
    "unsupported_media_type",
]


def status_object(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A failure ``Status`` exactly as the apiserver writes it."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    """An API answer other than success; ``status`` is its ``Status`` body."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status_object(code, reason, message, details)


def _details(kind: str, name: str, group: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return details


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def _about_object(
    code: int, reason: str, message: str, *, resource: str, name: str, group: str
) -> ApiError:
    """An error about one object; ``{object}`` in ``message`` stands for ``resource "name"``
    (group-qualified) as the apiserver writes it."""
    subject = f'{_qualified(resource, group)} "{name}"'
    return ApiError(code, reason, message.format(object=subject), _details(resource, name, group))


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    return _about_object(
        404, "NotFound", "{object} not found", resource=resource, name=name, group=group
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    return _about_object(
        409, "AlreadyExists", "{object} already exists", resource=resource, name=name, group=group
    )


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    return _about_object(
        409,
        "Conflict",
        "Operation cannot be fulfilled on {object}: the object has been modified; please "
        "apply your changes to the latest version and try again",
        resource=resource,
        name=name,
        group=group,
    )


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def internal_error(message: str) -> ApiError:
    return ApiError(500, "InternalError", f"Internal error occurred: {message}")


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                    f"format - accepted media types include: application/json-patch+json, "
                    f"application/merge-patch+json, application/strategic-merge-patch+json; "
                    f"got {content_type!r}")  # fmt: skip
