"""The asterisk-form request target (``GET *``) refused as a malformed request.

``*`` is a request target for ``OPTIONS`` only (RFC 9112, section 3.2.4). aiohttp from 3.14 refuses
it for any other method in its parser: 400, the connection closed. Before 3.14 (nixpkgs 26.05 has
3.13) it reached the router, which answered a 404 of its own that Aegis never counted, and kept
the connection open. This middleware answers it as 3.14 does, whichever aiohttp runs Aegis; like
the parser's refusals, it is a client's mistake, logged as one debug line and not counted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def asterisk_form_refused(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.raw_path != "*" or request.method == hdrs.METH_OPTIONS:
        return await handler(request)
    reason = f"request target * with {request.method}"
    log.debug(
        "malformed request", extra={"client": request.remote, "status": 400, "reason": reason}
    )
    response = web.Response(status=400, text=f"400: {reason}\n")
    response.force_close()
    return response
