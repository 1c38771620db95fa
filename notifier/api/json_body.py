"""JSON request bodies of the FastAPI routes: a body that is not JSON is a 400 saying why.

FastAPI itself answers 422 ["2: JSON decode error"] (a character position, no reason) for a
JSONDecodeError, and 400 "There was an error parsing the body" for what Python's json refuses by
raising anything else (an integer past 4300 digits, nesting past the recursion limit, bytes that
are no UTF-8 text). The ingest routes answer these as 400 "request body is not valid JSON: ...";
these routes now do the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute


class _JSONBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            raw = await self.body()
            if not raw.strip():
                raise HTTPException(400, "request body is empty; expected JSON")
            try:
                self._json = json.loads(raw)
            except RecursionError:
                raise HTTPException(400, "request body is not valid JSON: nested too deeply") from None
            # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an integer past
            # Python's 4300-digit limit.
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
