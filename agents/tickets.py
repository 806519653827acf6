"""The data of `ticket.created` and `ticket.triaged` events: the support-ticket contract.

Both structs ignore unknown fields, so producers can add to the payload without breaking the
agents. `customer_tier` is a free string on purpose: a tier the triage rules do not know (say,
"premium") should be triaged as standard, not make the whole ticket undecodable.

Example `ticket.created` data (JSON)::

    {"id": "T-1042", "title": "Checkout is down", "body": "500s since 09:12 for everyone",
     "reporter": "ops@acme.example", "service": "checkout", "customer_tier": "enterprise"}
"""

from __future__ import annotations

from typing import Literal

import msgspec

Priority = Literal["p1", "p2", "p3", "p4"]


class TicketCreated(msgspec.Struct, forbid_unknown_fields=False):
    """A support ticket as the help desk opened it."""

    id: str
    title: str
    body: str
    reporter: str
    service: str = ""  # the product or service the reporter named, if any
    customer_tier: str = "standard"  # free | standard | enterprise (others count as standard)


class TicketTriaged(msgspec.Struct, forbid_unknown_fields=False):
    """Who handles a ticket and how urgently, with the reasons a human can check."""

    ticket_id: str
    priority: Priority
    team: str
    reasons: list[str] = msgspec.field(default_factory=list)
    labels: list[str] = msgspec.field(default_factory=list)
