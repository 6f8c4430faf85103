"""Container health check: exit 0 when GET /health on this container's server answers 200.

Standard library only; the port follows LORA_SERVE_PORT as the server does.
"""

import os
import sys
import urllib.request

port = os.environ.get("LORA_SERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except OSError:
    sys.exit(1)
