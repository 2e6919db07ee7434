"""Who may call what.

- Every route declares its access with `guard(Access.X)` (`create_app` refuses to start with a route that
  declares none). Keys are checked through `fastapi.security` schemes, so /docs shows them and its
  Authorize button works: `X-API-Key: KEY` or `Authorization: Bearer KEY`. 401 without a valid key, 403
  with a key that lacks the scope; AUTH_MODE says which accesses need a key at all.
- `SameOriginWrites`: a state-changing request sent by a browser from another site is refused (403),
  whatever AUTH_MODE, unless that site is listed in CORS_ORIGINS. Browsers always send `Origin` on
  cross-origin POSTs, and `Sec-Fetch-Site` on all requests; curl and scripts send neither and are let through.
"""

import ipaddress
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.api.errors import api_routes, error_responses
from backend.core.config import Settings
from backend.core.errors import ConfigurationError, Forbidden, Unauthorized
from backend.services.keys import KeyInfo, Keys


class Access(StrEnum):
    PUBLIC = "public"  # never needs a key
    SEARCH = "search"  # needs a key only with AUTH_MODE=all
    WRITE = "write"
    ADMIN = "admin"
    METRICS = "metrics"  # needs a key only with METRICS_REQUIRE_KEY=true


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
KEY_HELP = "an API key (python -m backend.cli api-key create); also accepted as Authorization: Bearer KEY"
api_key_header = APIKeyHeader(name="X-API-Key", scheme_name="APIKeyHeader", auto_error=False, description=KEY_HELP)
bearer = HTTPBearer(scheme_name="Bearer", auto_error=False, description="Authorization: Bearer KEY")


def needs_key(access: Access, settings: Settings) -> bool:
    if settings.auth_mode == "off" or access is Access.PUBLIC:
        return False
    if access is Access.METRICS:
        return settings.metrics_require_key
    if access is Access.SEARCH:
        return settings.auth_mode == "all"
    return True


async def verified_key(keys: Keys, access: Access, key: str | None) -> KeyInfo | None:
    """The key's facts when `access` needs one and the key grants it; Unauthorized / Forbidden otherwise."""
    if not needs_key(access, keys.settings):
        return None
    if not key:
        raise Unauthorized(f"an API key with the '{access.value}' scope is required (X-API-Key or Authorization: Bearer)")
    info = await run_in_threadpool(keys.authenticate, key)
    if info is None:
        raise Unauthorized("invalid or revoked API key")
    if not info.grants(access.value):
        raise Forbidden(f"API key '{info.name}' lacks the '{access.value}' scope (it has: {', '.join(info.scopes)})")
    return info


def _checker(access: Access) -> Callable[..., Awaitable[KeyInfo | None]]:
    async def check(
        request: Request,
        header_key: Annotated[str | None, Security(api_key_header)] = None,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    ) -> KeyInfo | None:
        checked = getattr(request.state, "key_checked", None)  # by KeyBeforeBody, for this very route
        if checked is not None and checked[0] is access:
            info = checked[1]
        else:
            key = header_key or (credentials.credentials if credentials else None)
            info = await verified_key(request.app.state.services.keys, access, key)
        if info is not None:
            request.state.api_key = info.prefix  # for the request log
        return info

    return check


def presented_key(headers: Headers) -> str | None:
    """The key a request presents, as X-API-Key or Authorization: Bearer (the schemes the guards declare)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return headers.get("x-api-key") or (credentials.strip() if scheme.lower() == "bearer" else None) or None


async def viewer_is_admin(request: Request) -> bool:
    """Whether the caller may see server details (paths, database location): an admin key, or no keys at
    all (AUTH_MODE=off, loopback only). A missing or bad key is no error here: the caller is anonymous."""
    try:
        await verified_key(request.app.state.services.keys, Access.ADMIN, presented_key(request.headers))
    except (Unauthorized, Forbidden):
        return False
    return True


async def _public() -> None:  # async: /health must not need a worker thread
    return None


_CHECKS: dict[Access, Callable[..., Awaitable[Any]]] = {a: _public if a is Access.PUBLIC else _checker(a) for a in Access}
_ACCESS_OF = {check: access for access, check in _CHECKS.items()}


def guard(access: Access) -> DependsParam:
    """The dependency a route lists in `dependencies=[...]` to say who may call it."""
    return Depends(_CHECKS[access])


def route_access(route: APIRoute) -> Access | None:
    found = [_ACCESS_OF[d.dependency] for d in route.dependencies if d.dependency in _ACCESS_OF]
    if len(found) > 1:
        raise RuntimeError(f"{sorted(route.methods or ())} {route.path} declares {len(found)} accesses")
    return found[0] if found else None


def declare_access(app: FastAPI, settings: Settings) -> None:
    """Every route must say who may call it. The OpenAPI schema then says, under these settings, where a
    key is needed (security, 401/403) and where a cross-site request may be refused (403). The routes
    themselves are shared by every app made in this process, so only the schema is changed."""
    extra: dict[tuple[str, str], tuple[int, ...]] = {}
    keyless: set[tuple[str, str]] = set()
    for route in api_routes(app.routes):
        access = route_access(route)
        if access is None:
            raise RuntimeError(f"route {sorted(route.methods or ())} {route.path} does not declare its access (guard)")
        keyed = needs_key(access, settings)
        for method in route.methods or ():
            op = (route.path_format, method.lower())  # as the schema writes it: {job_id}, not {job_id:int}
            codes = (401, 403) if keyed else ()
            if method not in SAFE_METHODS:
                codes = (*codes, 403)  # cross-site
            extra[op] = codes
            if not keyed:
                keyless.add(op)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if (path, method) in keyless:
                    operation.pop("security", None)
                for code, entry in error_responses(*extra.get((path, method), ())).items():
                    if code != 503:
                        operation["responses"].setdefault(str(code), _schema_entry(entry))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _schema_entry(entry: dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{entry['model'].__name__}"}
    return {"description": entry["description"], "content": {"application/json": {"schema": ref}}}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(settings: Settings) -> list[str]:
    """Host names this server answers to (Starlette's TrustedHostMiddleware checks them): loopback names,
    every address of this machine's interfaces, its host name, and ALLOWED_HOSTS. A name that points
    here through DNS rebinding is none of these."""
    import socket

    import psutil

    names = {"localhost", "127.0.0.1", "[::1]", socket.gethostname().lower(), *settings.allowed_hosts}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                ip = address.address.split("%", 1)[0]
                names.add(f"[{ip}]" if ":" in ip else ip)
    return sorted(names)


def check_auth_mode(settings: Settings, host: str) -> str | None:
    """ConfigurationError for AUTH_MODE=off on an address others can reach; a warning line otherwise."""
    if settings.auth_mode != "off":
        return None
    if not is_loopback(host):
        raise ConfigurationError(
            f"AUTH_MODE=off is only allowed on a loopback address (127.0.0.1, ::1, localhost), not {host}: "
            "anyone who reaches the port could change the catalogue. Use AUTH_MODE=writes (the default) or --host 127.0.0.1"
        )
    return f"AUTH_MODE=off: no API keys are checked; anyone on this machine ({host}) can change the catalogue"


class SameOriginWrites:
    """Refuse state-changing requests sent from another site (see the module's docstring)."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = {o.lower().encode() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = dict(scope["headers"])
            origin = headers.get(b"origin")
            if origin is not None:
                own = origin.split(b"://", 1)[-1].lower() == headers.get(b"host", b"").lower()
                cross = not own and origin.lower() not in self.allowed
            else:  # a browser that sent no Origin still says where the request came from
                cross = headers.get(b"sec-fetch-site") == b"cross-site"
            if cross:
                body = {"detail": "cross-site request refused: the Origin is neither this server nor listed in CORS_ORIGINS"}
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class KeyBeforeBody:
    """Check the key of a route that needs one before its body is read: an anonymous 1 GiB archive is
    refused with its 401 at once, not after it was spooled to disk. The route's own guard then reuses the
    answer (request.state.key_checked) instead of asking the database again."""

    def __init__(self, app: ASGIApp, routes_of: FastAPI) -> None:
        self.app, self.routes_of = app, routes_of

    def _access(self, scope: Scope) -> Access | None:
        for route in api_routes(self.routes_of.routes):
            if route.matches(scope)[0] is Match.FULL:
                return route_access(route)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        keys: Keys = scope["app"].state.services.keys
        access = self._access(scope)
        if access is None or not needs_key(access, keys.settings):
            await self.app(scope, receive, send)
            return
        try:
            info = await verified_key(keys, access, presented_key(Headers(scope=scope)))
        except (Unauthorized, Forbidden) as exc:
            await JSONResponse({"detail": exc.message}, status_code=exc.status_code)(scope, receive, send)
            return
        scope.setdefault("state", {})["key_checked"] = (access, info)
        await self.app(scope, receive, send)
