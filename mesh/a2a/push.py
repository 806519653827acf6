"""Push notifications: where an agent may POST task updates (the SSRF guard), and the pieces
a2a-sdk's request handler needs to send them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
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
    or a test bench) skips the address checks. The policy runs when a config is created and
    again before each delivery (the address may have changed in between).
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
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            log.warning("push URL refused: %s does not resolve", host)
            return False
        addresses = {str(info[4][0]) for info in infos}
        blocked = sorted(a for a in addresses if not _public(a))
        if blocked or not addresses:
            log.warning("push URL refused: %s resolves to %s", host, ", ".join(blocked))
            return False
        return True


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
            # No redirects: a public webhook must not bounce the POST to an internal address.
            self._http = httpx.AsyncClient(timeout=PUSH_TIMEOUT_S, follow_redirects=False)
            self.sender = BasePushNotificationSender(
                self._http, self.configs, push_url_validator=policy
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
