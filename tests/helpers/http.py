"""One JSON request to a test's own server, answered as (HTTP status, decoded JSON body) for 2xx and 4xx/5xx alike."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def request_json(url: str, body: Any, method: str = "POST", timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
