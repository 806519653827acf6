"""`python -m agents.conformance` — serve the conformance agent until SIGINT/SIGTERM."""

from agents.conformance.app import main

main()
