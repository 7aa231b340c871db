"""The one error type a handler raises for bad input: it becomes that request's 4xx JSON body."""

from __future__ import annotations


class InputError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}
