"""The HTTP server, the engine's front end and its core import no torch (the worker alone does)."""

from __future__ import annotations

import subprocess
import sys

FRONT = ["pagoda.server.app", "pagoda.server.launch", "pagoda.api.params", "pagoda.api.outputs",
         "pagoda.api.messages", "pagoda.engine.frontend.core_client", "pagoda.engine.frontend.output_processor", "pagoda.cli",
         # The core and its scheduler hold no tensors either: torch comes with the worker.
         "pagoda.engine.core.engine_core", "pagoda.engine.core.scheduler", "pagoda.engine.step", "pagoda.engine.worker.executor"]


def test_server_and_front_end_load_no_torch() -> None:
    imports = "".join(f"import {m}\n" for m in FRONT)
    code = f"import sys\n{imports}print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gateway_talks_http_only() -> None:
    """The gateway imports nothing of the engine, the model or the server, and no torch."""
    code = ("import sys\nimport pagoda.gateway.app, pagoda.gateway.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'"
            " or m.startswith(('pagoda.engine', 'pagoda.model', 'pagoda.server'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
