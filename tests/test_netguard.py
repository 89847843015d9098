"""The network guard: address classification, resolution checks and pinned connections (HTTP and TLS)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from storage import netguard
from storage.errors import FetchFailed, InputForbidden, InvalidInput
from tests.fixtures.services import free_port

FORBIDDEN = [
    "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "224.0.0.1", "240.0.0.1",
    "255.255.255.255", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    "2001:db8::1",  # documentation
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "100.128.0.1"]
METADATA = ["169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "::ffff:169.254.169.254"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    assert netguard.forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert netguard.forbidden_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", METADATA)
def test_metadata_is_refused_even_when_private_is_allowed(address: str) -> None:
    assert netguard.forbidden_reason(ipaddress.ip_address(address), allow_private=True) is not None


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x.jpg",
        "https://[::1]:8443/x.jpg",
        "http://localhost:6379/",
        "https://2130706433/",  # 127.0.0.1 as one decimal number: the resolver normalises it
        "https://0x7f.1/",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::ffff:7f00:1]/",
    ],
)
def test_check_url_refuses_internal_targets(url: str) -> None:
    with pytest.raises(InputForbidden) as info:
        netguard.check_url(url, allow_private=False)
    assert info.value.code == "input_forbidden"


def test_check_url_allows_private_when_asked() -> None:
    assert netguard.check_url("http://127.0.0.1:9/x", allow_private=True) == "127.0.0.1"
    assert netguard.check_url("https://8.8.8.8/x", allow_private=False) == "8.8.8.8"
    with pytest.raises(InputForbidden):
        netguard.check_url("http://169.254.169.254/", allow_private=True)


@pytest.mark.parametrize(
    "url", ["https:///path", "ftp://example.com/x", "https://example.com:99999/", "nope"]
)
def test_check_url_rejects_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        netguard.check_url(url, allow_private=False)


def _fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Patch the resolver (DNS is external); returns the list of names looked up."""
    calls: list[str] = []

    def resolve(host: str, port: int) -> list:
        calls.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in answers[host]]

    monkeypatch.setattr(netguard, "resolve", resolve)
    return calls


def test_check_url_refuses_a_name_with_any_private_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.0.0.7"], "ok.example": ["93.184.216.34"]})
    with pytest.raises(InputForbidden):
        netguard.check_url("https://mixed.example/a.jpg", allow_private=False)
    assert netguard.check_url("https://ok.example/a.jpg", allow_private=False) == "93.184.216.34"


def test_unresolvable_and_failing_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {})
    with pytest.raises(InvalidInput) as info:
        netguard.check_url("https://nowhere.example/", allow_private=False)
    assert info.value.code == "unresolvable_host"

    def temporary_failure(host: str, port: int) -> list:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(netguard, "resolve", temporary_failure)
    with pytest.raises(FetchFailed):
        netguard.check_url("https://flaky.example/", allow_private=False)


def test_real_resolver_handles_localhost() -> None:
    addresses = netguard.resolve("localhost", 80)
    assert addresses and all(a.is_loopback for a in addresses)


# --- pinned connections ----------------------------------------------------------------------
class _Echo(BaseHTTPRequestHandler):
    """Answers with the Host header it saw; /redirect answers 302."""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (self.headers.get("Host") or "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Echo))


def test_guarded_request_connects_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, echo_port: int
) -> None:
    calls = _fake_dns(monkeypatch, {"faces.example": ["127.0.0.1"]})
    resp = netguard.guarded_request(
        "GET", f"http://faces.example:{echo_port}/x", allow_private=True, timeout=5
    )
    assert resp.status_code == 200
    assert resp.text == f"faces.example:{echo_port}"  # the name travels in Host, the IP is dialled
    assert calls == ["faces.example"]  # resolved once: no second lookup an attacker could rebind


def test_guarded_request_refuses_before_connecting(monkeypatch: pytest.MonkeyPatch, echo_port: int) -> None:
    _fake_dns(monkeypatch, {"rebind.example": ["127.0.0.1"]})
    with pytest.raises(InputForbidden):
        netguard.guarded_request("GET", f"http://rebind.example:{echo_port}/", allow_private=False, timeout=5)


def test_guarded_request_never_follows_redirects(echo_port: int) -> None:
    resp = netguard.guarded_request(
        "GET", f"http://127.0.0.1:{echo_port}/redirect", allow_private=True, timeout=5
    )
    assert resp.status_code == 302


def test_guarded_request_ignores_proxy_variables(monkeypatch: pytest.MonkeyPatch, echo_port: int) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    resp = netguard.guarded_request("GET", f"http://127.0.0.1:{echo_port}/", allow_private=True, timeout=5)
    assert resp.status_code == 200


def _make_certs(directory: Path, hostname: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `hostname`: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "faceparse test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An HTTPS echo server on 127.0.0.1 whose certificate names faces.example, trusted via the CA bundle."""
    ca, cert, key = _make_certs(tmp_path, "faces.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    sni_seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: sni_seen.append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.sni_seen = sni_seen  # type: ignore[attr-defined]
    yield from _serve(server)
    assert "faces.example" in sni_seen


def test_tls_to_a_pinned_address_verifies_the_name(monkeypatch: pytest.MonkeyPatch, tls_port: int) -> None:
    _fake_dns(monkeypatch, {"faces.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    resp = netguard.guarded_request(
        "GET", f"https://faces.example:{tls_port}/", allow_private=True, timeout=5
    )
    assert resp.status_code == 200 and resp.text == f"faces.example:{tls_port}"
    # Same address, a name the certificate does not carry: verification must still fail.
    with pytest.raises(requests.exceptions.SSLError):
        netguard.guarded_request("GET", f"https://other.example:{tls_port}/", allow_private=True, timeout=5)
