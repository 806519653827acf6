"""The agent docs/write-an-agent.md builds, as real files (the guide shows them as
`agents/four_eyes/` and `cards/four-eyes.json`; tests/docs/test_docs.py holds them equal)."""
