"""The network guard: which hosts the service may fetch inputs from and post webhooks to.

Outbound requests to client-chosen URLs are an SSRF risk: a URL could point at Redis on
loopback, a private network or the cloud metadata endpoint. `check_url` resolves the host
and refuses any such address; `guarded_request` then connects to exactly the address that
was checked (keeping the name for the `Host` header, SNI and certificate checks), so a DNS
answer that changes between the check and the connection (DNS rebinding) cannot slip past.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from storage.errors import FetchFailed, InputForbidden, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services: refused even when private addresses are allowed, because
# nothing legitimate (a test receiver, an in-cluster webhook) lives there.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
# Pinning overrides this hook (requests >= 2.32); without it the pin would silently not happen.
if not hasattr(HTTPAdapter, "build_connection_pool_key_attributes"):
    raise ImportError("storage.netguard needs requests>=2.32 (connection pinning)")

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def forbidden_reason(ip: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why `ip` must not be contacted, or None when it may be."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 form that carries an IPv4 address is judged by that address.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = forbidden_reason(embedded, allow_private=allow_private)
            return f"{reason} (embedded in {ip})" if reason else None
    if allow_private:
        return None
    checks = (
        (ip.is_unspecified, "unspecified address"),
        (ip.is_loopback, "loopback address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "carrier-grade NAT address"),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
        (not ip.is_global, "non-public address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses `host` resolves to (TCP), in the resolver's order. Tests patch this."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[IPAddress] = []
    for *_, sockaddr in infos:
        # Drop an IPv6 zone ("fe80::1%eth0") before parsing.
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in seen:
            seen.append(ip)
    return seen


def _host_and_port(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed URL: {url!r}", code="invalid_url") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidInput(f"only http(s) URLs can be fetched: {url!r}", code="unsupported_scheme")
    host = parts.hostname
    if not host:
        raise InvalidInput(f"URL without a host: {url!r}", code="invalid_url")
    return scheme, host, port or _DEFAULT_PORTS[scheme]


def check_url(url: str, *, allow_private: bool) -> str:
    """Resolve the URL's host and return the address to connect to; InputForbidden if any is refused.

    Every address the name resolves to must be allowed (an attacker's DNS could otherwise mix
    a public and a private answer); the first one is returned so the caller connects to it.
    """
    _, host, port = _host_and_port(url)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except UnicodeError as exc:
            raise InvalidInput(f"invalid host name in {url!r}", code="invalid_url") from exc
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise InvalidInput(f"host {host!r} does not resolve", code="unresolvable_host") from exc
            raise FetchFailed(f"could not resolve {host!r}: {exc}") from exc
    if not addresses:
        raise InvalidInput(f"host {host!r} does not resolve", code="unresolvable_host")
    for ip in addresses:
        reason = forbidden_reason(ip, allow_private=allow_private)
        if reason:
            raise InputForbidden(f"refusing to connect to {host} ({ip}): {reason}")
    return str(addresses[0])


class _PinnedAdapter(HTTPAdapter):
    """Connects to one checked address whatever DNS says now; TLS still verifies the host name."""

    def __init__(self, address: str, hostname: str) -> None:
        self._address = address
        self._hostname = hostname
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params["host"] = self._address
        if host_params["scheme"] == "https":
            pool_kwargs["server_hostname"] = self._hostname
            pool_kwargs["assert_hostname"] = self._hostname
        return host_params, pool_kwargs


def _host_header(host: str, port: int, scheme: str) -> str:
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        name = host
    if ":" in name:  # an IPv6 literal
        name = f"[{name}]"
    return name if port == _DEFAULT_PORTS[scheme] else f"{name}:{port}"


def guarded_request(
    method: str,
    url: str,
    *,
    allow_private: bool,
    timeout: float | tuple[float, float],
    headers: Mapping[str, str] | None = None,
    data: bytes | str | None = None,
    stream: bool = False,
) -> requests.Response:
    """One HTTP(S) request to a checked, pinned address; redirects are returned, never followed.

    Raises InputForbidden/InvalidInput from the check, and requests' own exceptions
    (Timeout, ConnectionError, SSLError) from the transport for the caller to classify.
    """
    scheme, host, port = _host_and_port(url)
    address = check_url(url, allow_private=allow_private)
    session = requests.Session()
    # No proxies from the environment (a proxy would connect to the unchecked name) and
    # no .netrc credentials; a custom CA bundle is still honoured.
    session.trust_env = False
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True
    adapter = _PinnedAdapter(address, host)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    prepared = session.prepare_request(requests.Request(method, url, headers=dict(headers or {}), data=data))
    prepared.headers["Host"] = _host_header(host, port, scheme)
    try:
        return session.send(prepared, timeout=timeout, allow_redirects=False, stream=stream)
    finally:
        if not stream:
            session.close()
