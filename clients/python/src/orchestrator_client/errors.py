"""Errors the API answers, as exceptions carrying its ``{code, message}``.

Every error answer of the coordinator is a JSON object ``{code, message}``; the message of a
bad-input error starts with the field at fault (``prompt: must not be empty``). Each code has
its own exception class, so callers can catch exactly what they handle::

    try:
        client.submit("")
    except InvalidField as e:
        print(e.field, e.message)
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class OrchestratorError(Exception):
    """Base of every error this client raises."""


class ApiError(OrchestratorError):
    """An error answer of the API: ``status`` (HTTP), ``code`` and ``message`` (the body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    @property
    def field(self) -> Optional[str]:
        """The field the message names (``prompt`` in ``prompt: must not be empty``), if any."""
        head, sep, _ = self.message.partition(":")
        if sep and head and " " not in head.strip():
            return head.strip()
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class MalformedBody(ApiError):
    """``malformed_body`` (400): the body is not JSON."""


class InvalidField(ApiError):
    """``invalid_field`` (400): a field's value is refused; :attr:`field` names it."""


class Unauthorized(ApiError):
    """``unauthorized`` (401): no token, or a token the coordinator does not accept."""


class NotFound(ApiError):
    """``not_found`` (404): no such task or agent (or not visible to this token)."""


class Conflict(ApiError):
    """``conflict`` (409): the request does not fit the current state (no session to continue)."""


class PayloadTooLarge(ApiError):
    """``payload_too_large`` (413)."""


class Unavailable(ApiError):
    """``unavailable`` (503): Redis or NATS is unreachable, or no coordinator leads; retry."""


class InternalError(ApiError):
    """``internal`` (500)."""


class TransportError(OrchestratorError):
    """The coordinator could not be reached, or answered something that is not the API's."""


_BY_CODE: Dict[str, Type[ApiError]] = {
    "malformed_body": MalformedBody,
    "invalid_field": InvalidField,
    "unauthorized": Unauthorized,
    "not_found": NotFound,
    "conflict": Conflict,
    "payload_too_large": PayloadTooLarge,
    "unavailable": Unavailable,
    "internal": InternalError,
}


def error_for(status: int, code: str, message: str) -> ApiError:
    """The exception for an error answer (:class:`ApiError` itself for a code this client does
    not know yet)."""
    return _BY_CODE.get(code, ApiError)(status, code, message)
