"""Kubernetes ``Status`` errors.

Every failure the API server reports is an :class:`APIError`; the HTTP layer turns it into the
``{"kind": "Status", "status": "Failure", ...}`` body that clients (kubectl, the ``kubernetes``
client, kopf) parse, with the matching HTTP code.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An API failure carrying the fields of a ``metav1.Status``."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        """The ``Status`` body sent to the client."""
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(name: str | None, group: str, kind: str) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": kind}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


def qualified(plural: str, group: str) -> str:
    """``pods`` for the core group, ``trainingjobs.loco.dev`` otherwise (as in real messages)."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> APIError:
    return APIError(404, "NotFound", f'{qualified(plural, group)} "{name}" not found', _details(name, group, plural))


def already_exists(plural: str, group: str, name: str) -> APIError:
    return APIError(
        409, "AlreadyExists", f'{qualified(plural, group)} "{name}" already exists', _details(name, group, plural)
    )


def conflict(plural: str, group: str, name: str, why: str) -> APIError:
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": {why}',
        _details(name, group, plural),
    )


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> APIError:
    return APIError(405, "MethodNotAllowed", message)


def gone(message: str) -> APIError:
    """410 for a resourceVersion older than the server still holds (kube-apiserver's reason: Expired)."""
    return APIError(410, "Expired", message)


def too_large_resource_version(requested: int, current: int) -> APIError:
    """504, as kube-apiserver answers a list from a resourceVersion it has not reached within 3 s."""
    return APIError(504, "Timeout", f"Timeout: Too large resource version: {requested}, current: {current}",
                    {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                     "retryAfterSeconds": 1})


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> APIError:
    """422 Invalid naming every bad field.

    ``causes`` is a list of ``(field, "field: Invalid value: ...: why")`` pairs; the message joins them
    like the real apiserver: one cause bare, several in ``[a, b]``.
    """
    messages = [message for _, message in causes]
    joined = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
    qualified_kind = f"{kind}.{group}" if group else kind
    details = _details(name, group, kind)
    details["causes"] = [
        {"reason": _cause_reason(message), "message": message.removeprefix(f"{field}: "), "field": field}
        for field, message in causes
    ]
    return APIError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {joined}', details)


def _cause_reason(message: str) -> str:
    if "Required value" in message:
        return "FieldValueRequired"
    if "Unsupported value" in message:
        return "FieldValueNotSupported"
    if "Forbidden" in message:
        return "FieldValueForbidden"
    if " must be of type " in message:
        return "FieldValueTypeInvalid"
    return "FieldValueInvalid"
