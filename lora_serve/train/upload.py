"""Send a saved adapter folder to a running lora-serve: POST {url}/v1/adapters, multipart/form-data.

Fields as the server reads them (api/upload.py): name, adapter_config (file), adapter_model (file).
Standard library only, so uploading needs nothing the CLI does not already have.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from ..lora.lora_model import CONFIG_FILE, WEIGHTS_FILE


def upload_adapter(url: str, name: str, folder: Path, api_key: str | None = None, timeout_s: float = 300.0) -> dict:
    """The server's JSON reply (the registered adapter); RuntimeError with the server's message on failure."""
    boundary = f"lora-serve-{secrets.token_hex(16)}"
    body = _multipart(
        boundary,
        {"name": name},
        {
            "adapter_config": (CONFIG_FILE, (Path(folder) / CONFIG_FILE).read_bytes()),
            "adapter_model": (WEIGHTS_FILE, (Path(folder) / WEIGHTS_FILE).read_bytes()),
        },
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/adapters", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"upload to {url} failed: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"upload to {url} failed: {e.reason}") from None


def _multipart(boundary: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> bytes:
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for key, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)
