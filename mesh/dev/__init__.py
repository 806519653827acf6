"""The developer shell: run a whole mesh as local processes (`mesh up`, `mesh demo`), as the
project's `mesh.toml` describes it (`topology`), started and stopped by `launcher`.

Part of the application shell, like `mesh.cli`: it may import `coordinator` and `agents`;
the library core never imports it.
"""
