"""Requests to the HTTP server (tests/test_serve.py, tests/test_successor_stack.py)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request


def request(url: str, body=None, raw: bytes | None = None):
    """(status, decoded JSON or the raw text of an event stream)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=300) as response:
            text = response.read().decode()
            status = response.status
            kind = response.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        text, status, kind = e.read().decode(), e.code, e.headers.get("Content-Type")
    return status, json.loads(text) if kind == "application/json" else text


def image_part(path) -> dict:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded}}
