"""Layers take plain numbers and tensors: importing them pulls in no request, engine or server types."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("selfhost.engine", "selfhost.sampling_params", "selfhost.outputs", "selfhost.server", "transformers")

PROBE = f"""
import importlib, pkgutil, sys
import selfhost.layers
for info in pkgutil.iter_modules(selfhost.layers.__path__):
    importlib.import_module("selfhost.layers." + info.name)
loaded = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))
print(",".join(loaded))
"""


def test_importing_every_layer_imports_no_request_engine_or_server_module():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
