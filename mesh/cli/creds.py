"""`mesh creds`: issue, list and revoke identities (NATS nkey, signing key, A2A token).

Every identity is a file of mode 0600 in the identity folder (`<MESH_HOME>/identity`, the one
`mesh up` uses; `--dir` for another), or where `--out` says. Nothing secret is ever printed:
the command says where the file is and how a process uses it. A running `mesh up` in this
folder reloads its NATS servers, so a new identity works at once and a revoked one is cut off.

    mesh creds agent my-agent                    # → .mesh/identity/agent-my-agent.json
    mesh creds publisher billing --tenant acme   # may publish mesh.evt.acme.> only
    mesh creds reader auditor --tenant acme      # may read acme's decisions, DLQ, audit
    mesh creds human alice --tenant clinic --role clinical-safety-officer   # answers approvals
    mesh creds revoke .mesh/identity/agent-my-agent.json
    mesh creds compose                           # compose/secrets: identities, NATS auth, TLS
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mesh.cli._common import JsonOption, out, print_json, user_errors
from mesh.errors import ConfigError, NotFoundError
from mesh.identity import ALL_TENANTS, IdentityDir, Role, identity_dir

app = typer.Typer(
    help="Identities: issue one for an agent, publisher, reader, coordinator or operator; "
    "list; revoke.",
    no_args_is_help=True,
)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        metavar="PATH",
        help="The identity folder (default: the one `mesh up` uses: MESH_IDENTITY's, else "
        "<MESH_HOME>/identity).",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", metavar="FILE", help="Write the identity here (default: the folder)."),
]
TenantOption = Annotated[str, typer.Option("--tenant", metavar="T", help="Its one tenant.")]


def _folder(explicit: Path | None) -> IdentityDir:
    """`--dir`, else the folder `mesh up` uses (MESH_IDENTITY's, or <MESH_HOME>/identity)."""
    from mesh import natsauth
    from mesh.settings import get_settings

    if explicit is not None:
        return IdentityDir.init(explicit)
    settings = get_settings()
    found = natsauth.resolve_identity_dir(settings)
    return found or IdentityDir.init(identity_dir(settings.home))


def _issue(
    role: Role,
    name: str,
    tenant: str,
    folder: Path | None,
    out_file: Path | None,
    *,
    claims: list[str] | None = None,
) -> None:
    with user_errors():
        ids = _folder(folder)
        target = out_file or ids.path / IdentityDir.file_name(role, name, tenant)
        if target.exists():
            raise ConfigError(
                f"{target} already exists",
                hint=f"revoke it first (`mesh creds revoke {target}`), or write another file "
                "with --out",
            )
        path = ids.issue(role, name, tenant=tenant, path=target, claims=claims or ())
        of = f" (tenant {tenant})" if tenant != ALL_TENANTS else ""
        of += f" holding {', '.join(claims)}" if claims else ""
        out.print(f"issued {role} {name}{of}")
        out.print(f"  identity: {path} (mode 0600: keep it secret; never printed)")
        out.print(f"  trust:    {ids.trust_path}")
        out.print(f"  use:      MESH_IDENTITY={path} MESH_TRUST={ids.trust_path}", soft_wrap=True)
        _reload(ids)


def _reload(ids: IdentityDir) -> None:
    """Make the NATS servers of a `mesh up` running here admit the folder's users as they are."""
    from mesh.bus import read_state
    from mesh.server import reload_server
    from mesh.settings import get_settings

    state = read_state(get_settings().home)
    servers = (state or {}).get("servers") or []
    if not servers:
        out.print(
            "  no `mesh up` running here: the next one admits it; for another NATS server, "
            f"include {ids.path / 'nats-auth.conf'} (`mesh creds conf`) and reload it"
        )
        return
    users = ids.users()
    for s in servers:
        reload_server(int(s["pid"]), Path(s["auth"]), Path(s["log"]), users)
    out.print(f"  the running mesh's {len(servers)} NATS server(s) reloaded their users")


@app.command("agent")
def agent(
    name: Annotated[str, typer.Argument(help="The agent's name (its card's), e.g. my-agent.")],
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """An agent: serves mesh.a2a.NAME, writes only its own card and task keys."""
    _issue("agent", name, ALL_TENANTS, folder, out_file)


@app.command("publisher")
def publisher(
    name: Annotated[str, typer.Argument(help="Who publishes (the principal decisions name).")],
    tenant: TenantOption,
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """A publisher: may publish the events of one tenant (mesh.evt.T.>), nothing else."""
    _issue("publisher", name, tenant, folder, out_file)


@app.command("reader")
def reader(
    name: Annotated[str, typer.Argument(help="Who reads (an auditor, a dashboard).")],
    tenant: TenantOption,
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """A reader: may read one tenant's decisions, dead letters and audit records."""
    _issue("reader", name, tenant, folder, out_file)


@app.command("human")
def human(
    name: Annotated[str, typer.Argument(help="The person (the name their approvals carry).")],
    tenant: TenantOption,
    role: Annotated[
        list[str],
        typer.Option("--role", metavar="ROLE", help="An approver role they hold (repeatable)."),
    ],
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """A person: answers one tenant's approval requests for the roles they hold."""
    from mesh.approvals import approver_role, role_problem

    # Roles have one spelling (`clinical-safety-officer`): `clinical_safety_officer` is issued
    # as that, so it matches policies and Cedar groups whichever way it was typed.
    claims = [approver_role(r) for r in role]
    with user_errors():
        for r in claims:
            if (problem := role_problem(r)) is not None:
                raise ConfigError(problem, hint="e.g. --role clinical-safety-officer")
    _issue("human", name, tenant, folder, out_file, claims=claims)


@app.command("coordinator")
def coordinator(
    name: Annotated[str, typer.Argument(help="e.g. coordinator-eu (replicas may share one).")],
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """A coordinator: decides events; publishes decisions, dead letters and audit records."""
    _issue("coordinator", name, ALL_TENANTS, folder, out_file)


@app.command("operator")
def operator(
    name: Annotated[
        str | None, typer.Argument(help="Another operator's name (default: the folder's own).")
    ] = None,
    folder: DirOption = None,
    out_file: OutOption = None,
) -> None:
    """The operator (stream admin, root of trust): the folder's own, made on first use; with
    NAME, one more operator identity."""
    with user_errors():
        ids = _folder(folder)
        if name is None and out_file is None:
            out.print(f"operator identity: {ids.operator_path} (mode 0600)")
            out.print(f"trust:             {ids.trust_path}")
            return
    target = out_file or ids.path / f"operator-{name or 'admin'}.json"
    _issue("operator", name or "admin", ALL_TENANTS, folder, target)


@app.command("revoke")
def revoke(
    identity_file: Annotated[Path, typer.Argument(metavar="FILE", help="The identity file.")],
    folder: DirOption = None,
    retire: Annotated[
        bool,
        typer.Option(
            "--retire",
            help="Rotation, not a leak: what its key signed until now (decisions, audit "
            "records) still verifies; nothing it signs from now on does.",
        ),
    ] = False,
) -> None:
    """Revoke an identity: the NATS servers stop admitting it and its signing key is no longer
    trusted — for anything it ever signed (a leaked key), or, with --retire, for anything it
    signs from now on (a rotated key)."""
    with user_errors():
        if not identity_file.is_file():
            raise NotFoundError(
                f"no identity file {identity_file}", hint="see `mesh creds list` for who exists"
            )
        ids = _folder(folder)
        if identity_file.resolve() == ids.operator_path.resolve():
            raise ConfigError(
                "the folder's own operator is the root of trust; it cannot be revoked here",
                hint="make a new identity folder (`mesh creds --dir NEW operator`) instead",
            )
        identity = ids.revoke(identity_file, leaked=not retire)
        done = "retired" if retire else "revoked"
        out.print(f"{done} {identity.principal}; {identity_file} is useless now (delete it)")
        _reload(ids)


@app.command("list")
def list_identities(folder: DirOption = None, json_out: JsonOption = False) -> None:
    """The identities the folder's NATS users are (public keys only)."""
    with user_errors():
        ids = _folder(folder)
        users = ids.users()
    if json_out:
        print_json(
            [
                {
                    "role": u.role,
                    "name": u.name,
                    "tenant": "" if u.tenant == ALL_TENANTS else u.tenant,
                    "nkey": u.nkey,
                }
                for u in users
            ]
        )
        return
    table = Table(title=f"{len(users)} identit{'y' if len(users) == 1 else 'ies'} in {ids.path}")
    for col in ("role", "name", "tenant", "nkey"):
        table.add_column(col)
    for u in users:
        tenant = "" if u.tenant == ALL_TENANTS else u.tenant
        table.add_row(u.role, u.name, tenant, f"{u.nkey[:12]}…")
    out.print(table)


@app.command("conf")
def conf(
    out_file: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="Where to write the authorization.")
    ],
    folder: DirOption = None,
) -> None:
    """Write the nats-server `authorization {}` block admitting the folder's identities
    (include it in your server's config; `nats-server --signal reload` after a change)."""
    from mesh import natsauth

    with user_errors():
        ids = _folder(folder)
        natsauth.write_authorization(out_file, ids.users())
    out.print(f"wrote {out_file} ({len(ids.users())} users, mode 0600)")


@app.command("compose")
def compose(
    target: Annotated[
        Path,
        typer.Option(
            "--out", metavar="DIR", help="The secrets folder compose/docker-compose.yml mounts."
        ),
    ] = Path("compose/secrets"),
) -> None:
    """Everything compose/docker-compose.yml needs, in a git-ignored folder: an identity per
    mesh service (the schedule relay's too), the NATS servers' authorization, and certificates
    for mTLS between them."""
    from mesh import natsauth
    from mesh.dev import topology as topo
    from mesh.dev.launcher import SCHEDULER

    with user_errors():
        # The plan (and the settings it reads) first: a mistake there writes nothing.
        plan = topo.load(topo.find()).plan(cluster=True)
        ids = IdentityDir.init(target / "identity")
        wanted: list[tuple[Role, str, str]] = [("coordinator", "coordinator", ALL_TENANTS)]
        wanted += [("agent", topo.agent_name(a, plan.root), ALL_TENANTS) for a in plan.agents]
        # The schedule relay signs the events it publishes as this agent (as under `mesh up`).
        wanted.append(("agent", SCHEDULER, ALL_TENANTS))
        wanted.append(("publisher", "cli", os.environ.get("MESH_TENANT") or "default"))
        for role, name, tenant in wanted:
            natsauth.ensure_identity(ids, role, name, tenant=tenant)
        # What the NATS containers mount (no identity's private key in there).
        natsauth.write_authorization(target / "nats" / natsauth.AUTH_FILE, ids.users())
        tls = target / "nats" / "tls"
        if not (tls / "ca.pem").exists():
            nodes = ["nats-1", "nats-2", "nats-3"]
            issue_tls(tls, servers=nodes, clients=[], ca_key=target / "ca-key.pem")
    out.print(
        f"wrote {target}: identity/ (one per service), nats/{natsauth.AUTH_FILE}, nats/tls/ "
        "(every secret mode 0600)"
    )
    out.print(
        "next: docker compose -f compose/docker-compose.yml up -d --build "
        "(see the notes at the top of that file)"
    )


# -- certificates -------------------------------------------------------------------------------
def issue_tls(
    folder: Path,
    *,
    servers: list[str],
    clients: list[str],
    days: int = 365,
    ca_key: Path | None = None,
) -> Path:
    """A private CA (`ca.pem`; its key in `ca_key`, default `ca-key.pem` next to it) and,
    signed by it, a certificate per server name (`<name>.pem`, `<name>-key.pem`; good for
    serving and for routes, which connect as clients) and per client name. Private keys are
    written 0600. For mTLS between NATS nodes and for tests."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from mesh.identity import write_secret

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_private = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quorum-mesh CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_private, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_secret(ca_key or folder / "ca-key.pem", key_pem(ca_private))

    def leaf(name: str, usages: list[x509.ObjectIdentifier]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [x509.DNSName(name)]
        if name == "localhost":
            alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_private, hashes.SHA256())
        )
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_secret(folder / f"{name}-key.pem", key_pem(key))

    for name in servers:
        leaf(name, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for name in clients:
        leaf(name, [ExtendedKeyUsageOID.CLIENT_AUTH])
    return folder
