"""OIDC discovery: an issuer's ``/.well-known/openid-configuration`` and the JWKS URL in it.

Fetched with the standard library in a worker thread (``anyio.to_thread``), never on the
event loop.  The document's ``issuer`` must equal the configured issuer exactly (OpenID
Connect Discovery 1.0, section 4.3), or an attacker controlling the document's location could
vouch for another issuer's tokens.  Endpoints must be https, except on a loopback host.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio.to_thread

from pgwarden.config import IssuerSettings

WELL_KNOWN_PATH = "/.well-known/openid-configuration"
# A discovery document or JWKS is a few KiB; refuse to read an unbounded body.
MAX_DOCUMENT_BYTES = 1024 * 1024


class DiscoveryError(Exception):
    """The issuer's metadata could not be fetched or is unusable."""


def is_loopback_host(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str) -> None:
    """Raise :class:`DiscoveryError` unless ``url`` is https (or http on a loopback host)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    raise DiscoveryError(f"{url!r}: identity endpoints must use https (http only on loopback)")


def discovery_url(issuer: IssuerSettings) -> str:
    return issuer.discovery_url or issuer.issuer.rstrip("/") + WELL_KNOWN_PATH


def ssl_context(issuer: IssuerSettings) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(issuer.ca_file) if issuer.ca_file is not None else None
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could take the request to a plain-http or foreign host: follow none.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def fetch_json(url: str, *, timeout: float, context: ssl.SSLContext) -> object:
    """GET ``url`` and parse its JSON body (blocking: call it from a worker thread)."""
    check_endpoint_url(url)
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DiscoveryError(f"cannot fetch {url}: {exc}") from exc
    if len(body) > MAX_DOCUMENT_BYTES:
        raise DiscoveryError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise DiscoveryError(f"{url}: not JSON: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """What pgwarden uses from an issuer's discovery document."""

    issuer: str
    jwks_uri: str


def parse_metadata(issuer: IssuerSettings, document: object) -> ProviderMetadata:
    if not isinstance(document, dict):
        raise DiscoveryError("discovery document is not a JSON object")
    announced = document.get("issuer")
    if announced != issuer.issuer:
        raise DiscoveryError(
            f"discovery document names issuer {announced!r}, expected {issuer.issuer!r}"
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise DiscoveryError("discovery document has no jwks_uri")
    check_endpoint_url(jwks_uri)
    return ProviderMetadata(issuer=issuer.issuer, jwks_uri=jwks_uri)


async def discover(issuer: IssuerSettings, *, http_timeout: float) -> ProviderMetadata:
    """The issuer's metadata: from ``jwks_uri`` when configured, else by discovery."""
    if issuer.jwks_uri is not None:
        check_endpoint_url(issuer.jwks_uri)
        return ProviderMetadata(issuer=issuer.issuer, jwks_uri=issuer.jwks_uri)
    url = discovery_url(issuer)
    context = ssl_context(issuer)
    document = await anyio.to_thread.run_sync(
        lambda: fetch_json(url, timeout=http_timeout, context=context)
    )
    return parse_metadata(issuer, document)
