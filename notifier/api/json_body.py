"""JSON request bodies of the FastAPI routes, read as the ingest routes read theirs.

FastAPI reads a body with Python's json and answers what that refuses with 422 ["2: JSON decode
error"] (a character position, no reason) or 400 "There was an error parsing the body" (an
integer past 4300 digits, nesting past the recursion limit). And Python's json reads a lone
UTF-16 surrogate escape ("\\ud800") into a str that cannot be encoded as UTF-8: where a field
passes it through unchecked (a union such as DrillSpec.phases' `PhaseIn | str`, a plain `str`),
writing it to Redis or into a response failed with a 500.

So these routes parse with pydantic's parser (jiter), as notifier.api.ingest does, which refuses
a lone surrogate, and answer 400 "request body is not valid JSON: <why>" like the ingest routes.
A UTF-8 byte order mark, which Python's json skipped, is still skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute


class _JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            if not raw.strip():
                raise HTTPException(400, "request body is empty; expected JSON")
            try:
                self._json = pydantic_core.from_json(raw.removeprefix(b"\xef\xbb\xbf"))
            # Also for nesting past its recursion limit, an integer past 4300 digits, invalid UTF-8.
            except ValueError as exc:
                raise HTTPException(400, f"request body is not valid JSON: {exc}") from None
        return self._json


class JSONBodyRoute(APIRoute):
    """The route class of the routers taking JSON bodies (FastAPI re-raises an HTTPException
    raised while reading the body as it is)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_JSONBodyRequest(request.scope, request.receive))

        return handle
