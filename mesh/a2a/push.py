"""Push notifications: where an agent may POST task updates (the SSRF guard), and the pieces
a2a-sdk's request handler needs to send them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import urllib.parse

import httpx
from a2a.server.tasks import BasePushNotificationSender, InMemoryPushNotificationConfigStore
from a2a.types import AgentCard

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 10.0  # one webhook POST


class PushUrlPolicy:
    """Which webhook URLs an agent will POST task updates to (SSRF guard).

    Only http(s) URLs with a host; every address the host resolves to must be a public unicast
    address — private, loopback, link-local, shared (CGNAT), multicast, reserved and unspecified
    ones are refused, as is a host that does not resolve. `allow_private` (for a closed network
    or a test bench) skips the address checks. The policy runs when a config is created, and
    at each delivery `webhook_client` resolves the host once more, checks every address and
    connects to one of those very addresses (never resolving again), so a name that answers a
    public address to the check and an internal one to the connect gets nowhere.
    """

    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private

    async def __call__(self, url: str) -> bool:
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:
            return False
        host = parsed.hostname
        if parsed.scheme not in ("http", "https") or not host:
            return False
        if self.allow_private:
            return True
        return bool(await self.addresses(host, port))

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses `host` resolves to, in the resolver's order, every one checked; empty
        if the host does not resolve or (unless `allow_private`) any address is not public.

        `webhook_client` dials only these, so the answer checked is the answer used: a DNS
        name whose answer changes between a check and the connect (DNS rebinding) cannot
        steer a POST to an internal address.
        """
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            log.warning("push URL refused: %s does not resolve", host)
            return []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if self.allow_private:
            return addresses
        blocked = sorted(a for a in addresses if not _public(a))
        if blocked or not addresses:
            log.warning("push URL refused: %s resolves to %s", host, ", ".join(blocked))
            return []
        return addresses


def _public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


# A name may resolve to several addresses; the next is tried only when one cannot be reached.
_MAX_ADDRESSES = 4
_PORTS = {"http": 80, "https": 443}


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """Sends each request to an address `PushUrlPolicy.addresses` checked for its host.

    The request keeps its URL's host for the Host header, and for TLS (SNI and certificate
    verification, through httpcore's `sni_hostname` extension), so https still proves the
    server holds the name's certificate; only the TCP connect goes to the pinned address.
    """

    def __init__(self, policy: PushUrlPolicy, *, verify: ssl.SSLContext | bool = True) -> None:
        # No keep-alive: the pool keys connections by the address dialled, so a connection
        # verified for one name could otherwise carry a later request for another name that
        # resolves to the same address.
        super().__init__(verify=verify, limits=httpx.Limits(max_keepalive_connections=0))
        self._policy = policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.raw_host.decode("ascii")
        if url.scheme not in ("http", "https") or not host:
            raise httpx.UnsupportedProtocol("push delivery is over http(s) only", request=request)
        addresses = await self._policy.addresses(host, url.port or _PORTS[url.scheme])
        if not addresses:
            raise httpx.ConnectError(f"{host}: refused by the push URL policy", request=request)
        error: httpx.ConnectError | None = None
        for address in addresses[:_MAX_ADDRESSES]:
            pinned = httpx.Request(
                request.method,
                url.copy_with(host=address),
                headers=request.headers,  # Host: still the URL's name
                stream=request.stream,
                extensions={**request.extensions, "sni_hostname": host},
            )
            try:
                return await super().handle_async_request(pinned)
            except httpx.ConnectError as e:  # nothing was sent: the next checked address
                error = e
        assert error is not None
        raise error


def webhook_client(
    policy: PushUrlPolicy, *, verify: ssl.SSLContext | bool = True
) -> httpx.AsyncClient:
    """The HTTP client for webhook POSTs (push notifications; any other webhook must use it
    too): it connects only to addresses `policy` checked at that moment, and follows no redirect (a
    public webhook must not bounce the POST to an internal address). No proxy from the
    environment either: a proxy would resolve the name again, out of the policy's sight.
    `verify` is for tests with their own certificate authority."""
    return httpx.AsyncClient(
        timeout=PUSH_TIMEOUT_S,
        follow_redirects=False,
        transport=_PinnedTransport(policy, verify=verify),
    )


class Push:
    """An agent's push-notification machinery: config store, webhook client, sender.

    Only an agent whose card offers push keeps webhook configs (`configs` and `sender` are
    None otherwise), so a config sent inline with SendMessage is not honoured by an agent that
    says it has no push.
    """

    def __init__(self, card: AgentCard, policy: PushUrlPolicy) -> None:
        self.policy = policy
        self.configs: InMemoryPushNotificationConfigStore | None = None
        self.sender: BasePushNotificationSender | None = None
        self._http: httpx.AsyncClient | None = None
        if card.capabilities.push_notifications:
            self.configs = InMemoryPushNotificationConfigStore()
            self._http = webhook_client(policy)
            self.sender = BasePushNotificationSender(
                self._http, self.configs, push_url_validator=policy
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
