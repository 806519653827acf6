"""The triage agent: on every `ticket.created`, publish one `ticket.triaged` (cards/triage.json).

The same rules also answer A2A calls (a TicketCreated payload in, a TicketTriaged artifact out),
so a help desk can ask for a triage without going through the event stream. There is no Claude
prompt on purpose: a triage must come out the same on a redelivery and over A2A, and the rules
are cheap enough to run on every ticket.
"""

from __future__ import annotations

from agents.tickets import TicketCreated
from agents.triage.rules import triage
from mesh import Agent
from mesh.events import EventContext

agent = Agent("triage")
agent.rules(triage)


@agent.on_event("ticket.created")
async def triage_ticket(ticket: TicketCreated, ctx: EventContext) -> None:
    await ctx.publish("ticket.triaged", triage(ticket))
