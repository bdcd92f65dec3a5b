"""Upstream calls through the proxies the environment names, as any HTTP client on the host would make them.

``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` (either case) name a proxy per scheme of the upstream URL;
``NO_PROXY`` lists the hosts reached directly (``urllib.request``'s reading of these variables: exact hosts,
domain suffixes, ``*``). :class:`Http1Transport` speaks only to origins directly, so when the environment names a
proxy, :func:`upstream_transport` puts :class:`ProxyRoutes` in front of it: calls to proxied origins go through
httpx's own transport with that proxy (``CONNECT`` tunnels for ``https``), the rest stay direct. Without proxy
variables the gateway uses :class:`Http1Transport` alone, so the request path pays nothing for this.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

import httpx

from .http1 import Http1Transport

__all__ = ["ProxyRoutes", "environment_proxies", "proxy_secrets", "upstream_transport"]


def environment_proxies() -> dict[str, str]:
    """The proxy URL per scheme (``http``, ``https``, ``all``) and the ``no`` list, as ``urllib.request`` reads
    them from the environment (either case, the lower-case one winning; empty values unset)."""
    found = urllib.request.getproxies_environment()
    return {k: v for k, v in found.items() if k in ("http", "https", "all", "no")}


def proxy_secrets() -> list[str]:
    """The credentials of the environment's proxy URLs (``user:password`` and the password, decoded), which an
    upstream's error page may quote (a proxy's page echoing the request's ``Proxy-Authorization``): scrubbed."""
    found: list[str] = []
    for key, proxy in environment_proxies().items():
        if key == "no":
            continue
        try:
            parts = urlsplit(proxy.strip())
            user, password = parts.username, parts.password
        except ValueError:
            continue
        if user or password:  # (a user alone is a token: httpx sends "user:" as Basic all the same)
            name, secret = unquote(user or ""), unquote(password or "")
            found += [f"{name}:{secret}", secret or name]
    return found


def _shown(proxy: str) -> str:
    """A proxy URL without its credentials, for an error message."""
    try:
        url = httpx.URL(proxy)
    except httpx.InvalidURL:
        return "(not a URL)"
    return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")


def _has_host(proxy: str) -> bool:
    """Whether a proxy URL names a host (no blanks in it, brackets only around an IPv6 address) and a port in
    range."""
    try:  # read as httpx reads it (a "[" in a password is no IPv6 address; blanks around the URL are stripped)
        url = httpx.URL(proxy.strip())
    except httpx.InvalidURL:
        return False
    host, port = url.host, url.port
    # (httpx keeps a host it cannot read percent-encoded: "[bad" is "%5Bbad", "bad host" "bad%20host")
    return bool(host) and "%" not in host and (port is None or 0 < port < 65536)


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` sends ``host`` direct: ``*``, the host itself or a domain it is in (``corp.example``
    and ``.corp.example`` both match ``api.corp.example``), each optionally with ``:port``; case ignored."""
    host = host.lower()
    for entry in no_proxy.replace(" ", "").lower().split(","):
        if entry == "*":
            return True
        name, _, entry_port = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
        name = name.strip("[]").lstrip(".")
        if not name or (entry_port and entry_port != str(port)):
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


class ProxyRoutes(httpx.AsyncBaseTransport):
    """``direct`` for origins that need no proxy; one httpx transport per proxy for the others."""

    def __init__(self, direct: httpx.AsyncBaseTransport, proxies: Mapping[str, str]) -> None:
        self._direct = direct
        self._proxies = dict(proxies)
        self._via: dict[str, httpx.AsyncBaseTransport] = {}  # proxy URL -> its transport
        for key, proxy in self._proxies.items():
            if key != "no" and proxy not in self._via:
                if not _has_host(proxy):  # httpx takes it, and every call through it failed (a 502 each)
                    raise ValueError(f"{key}_proxy {_shown(proxy)}: not a URL with a valid host and port")
                try:  # made now: a proxy httpx cannot use stops the start, not a request
                    self._via[proxy] = httpx.AsyncHTTPTransport(proxy=proxy)
                except ImportError as exc:  # socks5:// without httpx[socks]
                    raise ValueError(f"{key}_proxy {_shown(proxy)}: {exc}") from None
                except (ValueError, httpx.InvalidURL):  # its message would show the URL, credentials and all
                    raise ValueError(f"{key}_proxy {_shown(proxy)}: not an http, https or socks5 proxy URL") from None
        self._routes: dict[tuple[str, str, int], httpx.AsyncBaseTransport] = {}  # (scheme, host, port) -> transport

    def transport_for(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        """The transport a call to ``url`` goes through (decided once per scheme and host)."""
        port = url.port or (443 if url.scheme == "https" else 80)
        route = (url.scheme, url.host, port)
        found = self._routes.get(route)
        if found is None:
            proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
            if proxy is None or bypassed(url.host, port, self._proxies.get("no", "")):
                found = self._direct
            else:
                found = self._via[proxy]
            self._routes[route] = found
        return found

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transport_for(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        await self._direct.aclose()
        for transport in self._via.values():
            await transport.aclose()


def upstream_transport() -> httpx.AsyncBaseTransport:
    """The gateway's own upstream transport: :class:`Http1Transport`, behind :class:`ProxyRoutes` when the
    environment names a proxy."""
    proxies = environment_proxies()
    if not any(k != "no" for k in proxies):
        return Http1Transport()
    return ProxyRoutes(Http1Transport(), proxies)
