"""Identities for tests: the kit is secured like `mesh up`, with nothing to set up.

With an identity in effect (MESH_IDENTITY, or a `.mesh/identity` here), the kit uses its
folder. Without one, `test_identities()` makes a temporary identity folder and, while the block
runs, this process is its operator (MESH_IDENTITY and MESH_TRUST point into it; both are put
back after). Every embedded server the kit starts admits exactly that folder's identities, and
`issue` gives a test an identity of another role:

    with test_identities() as ids:
        reader = ids.issue("reader", "auditor", tenant="acme")   # a path, mode 0600
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mesh import natsauth
from mesh.identity import IdentityDir
from mesh.settings import Settings, get_settings

_VARS = ("MESH_IDENTITY", "MESH_TRUST")


@contextlib.contextmanager
def test_identities() -> Iterator[IdentityDir]:
    """The identity folder in effect, or a temporary one whose operator this process is for
    the block (see the module docstring)."""
    ids = natsauth.resolve_identity_dir(Settings())
    if ids is not None:
        yield ids
        return
    folder = Path(tempfile.mkdtemp(prefix="mesh-test-ids-"))
    ids = IdentityDir.init(folder / "identity")
    saved = {k: os.environ.get(k) for k in _VARS}
    os.environ["MESH_IDENTITY"] = str(ids.operator_path)
    os.environ["MESH_TRUST"] = str(ids.trust_path)
    get_settings.cache_clear()  # settings are read once per process: see the change
    try:
        yield ids
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        shutil.rmtree(folder, ignore_errors=True)


test_identities.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest
