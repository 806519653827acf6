"""`python -m coordinator` — the same as `mesh coordinator`."""

from coordinator.run import main

main()
