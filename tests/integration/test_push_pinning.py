"""Webhook delivery connects to the address the SSRF guard checked (mesh/a2a/push.py).

A name is resolved once per POST; the TCP connect goes to an address from that one answer,
while the name stays in the Host header and, over https, in SNI and certificate verification.
Every server here listens on 127.0.0.1; names are answered by a fake event-loop resolver that
answers each name once only (as a rebinding DNS server with TTL 0 might), so a second lookup by
the HTTP stack fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.a2a.push import PushUrlPolicy, webhook_client

LOOPBACK = "127.0.0.1"
UNUSED = "127.0.0.2"  # loopback too, but nothing listens there


class _Hook:
    """An HTTP(S) receiver on 127.0.0.1 that records each request's head and TLS server name."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.heads: list[dict[str, str]] = []
        self.server_names: list[str | None] = []
        self.port = 0
        if tls is not None:
            tls.sni_callback = self._sni

    def _sni(self, _sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.server_names.append(name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
            }
            await reader.readexactly(int(headers.get("content-length", "0")))
            self.heads.append(headers)
            writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def _hook(tls: ssl.SSLContext | None = None) -> AsyncIterator[_Hook]:
    hook = _Hook(tls)
    server = await asyncio.start_server(hook._serve, LOOPBACK, 0, ssl=tls)
    hook.port = server.sockets[0].getsockname()[1]
    try:
        yield hook
    finally:
        server.close()


@pytest.fixture
async def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the running loop's resolver answers, each ONCE; a later lookup of one fails.

    Both spellings count (anyio, under httpx, asks with bytes). Other names go to the real
    resolver.
    """
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    answers: dict[str, list[str]] = {}
    asked: set[str] = set()

    async def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode("ascii") if isinstance(host, bytes) else host
        if name not in answers:
            return await real(host, port, *args, **kwargs)
        if name in asked:
            raise socket.gaierror(socket.EAI_NONAME, f"{name} asked twice")
        asked.add(name)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))
            for address in answers[name]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", fake)
    return answers


def _certificates(tmp: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a server certificate for `name` only (no IP address in it): the
    server's TLS context, and a client context that trusts just that CA."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("push test CA", ca_key, "push test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(name, key, "push test CA", ca_key, ca=False)
    chain, key_file = tmp / "server.pem", tmp / "server.key"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain, key_file)
    client = ssl.create_default_context(
        cadata=ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
    )
    return server, client


async def test_the_post_goes_to_the_address_checked_not_to_a_second_lookup(
    dns: dict[str, list[str]],
) -> None:
    dns["hook.push.test"] = [LOOPBACK]
    async with _hook() as hook, webhook_client(PushUrlPolicy(allow_private=True)) as http:
        answer = await http.post(f"http://hook.push.test:{hook.port}/hook", json={"n": 1})
    assert answer.status_code == 204
    assert [h["host"] for h in hook.heads] == [f"hook.push.test:{hook.port}"]


async def test_a_name_answering_loopback_is_refused_at_the_connect(
    dns: dict[str, list[str]],
) -> None:
    """The transport checks by itself: a caller that skipped the policy still cannot reach
    loopback through a name."""
    dns["hook.push.test"] = [LOOPBACK]
    async with _hook() as hook, webhook_client(PushUrlPolicy()) as http:
        with pytest.raises(httpx.ConnectError, match="refused by the push URL policy"):
            await http.post(f"http://hook.push.test:{hook.port}/hook", json={"n": 1})
    assert hook.heads == []


async def test_a_public_and_a_private_answer_together_are_refused(
    dns: dict[str, list[str]],
) -> None:
    dns["hook.push.test"] = ["93.184.215.14", LOOPBACK]
    async with _hook() as hook, webhook_client(PushUrlPolicy()) as http:
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://hook.push.test:{hook.port}/hook", json={"n": 1})
    assert hook.heads == []


async def test_an_unreachable_address_falls_back_to_the_next_checked_one(
    dns: dict[str, list[str]],
) -> None:
    dns["hook.push.test"] = [UNUSED, LOOPBACK]
    async with _hook() as hook, webhook_client(PushUrlPolicy(allow_private=True)) as http:
        answer = await http.post(f"http://hook.push.test:{hook.port}/hook", json={"n": 1})
    assert answer.status_code == 204
    assert len(hook.heads) == 1


async def test_https_through_the_pinned_address_verifies_the_hostname(
    dns: dict[str, list[str]], tmp_path: Path
) -> None:
    """Pinning the IP must not weaken TLS: the certificate is checked against the URL's name
    (sent as SNI), so a name the certificate does not cover fails, even at the same address."""
    server_tls, client_tls = _certificates(tmp_path, "hook.push.test")
    dns["hook.push.test"] = [LOOPBACK]
    dns["other.push.test"] = [LOOPBACK]
    policy = PushUrlPolicy(allow_private=True)
    async with _hook(server_tls) as hook, webhook_client(policy, verify=client_tls) as http:
        answer = await http.post(f"https://hook.push.test:{hook.port}/hook", json={"n": 1})
        assert answer.status_code == 204
        assert hook.server_names == ["hook.push.test"]
        assert [h["host"] for h in hook.heads] == [f"hook.push.test:{hook.port}"]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.post(f"https://other.push.test:{hook.port}/hook", json={"n": 2})
    assert len(hook.heads) == 1
