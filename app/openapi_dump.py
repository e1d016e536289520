"""Write the OpenAPI spec of `create_app()` with tokens on:
`python -m app.openapi_dump openapi/openapi.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def spec() -> dict[str, Any]:
    """The spec of a service with tokens on, as one reachable beyond loopback runs: every
    call but /healthz and /readyz needs a bearer token. (An open service's own /openapi.json
    also allows calls without one.)"""
    from pydantic import SecretStr

    from app.config import Settings
    from app.main import create_app

    return create_app(Settings(admin_token=SecretStr("spec"))).openapi()


def render() -> str:
    return json.dumps(spec(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if not args or args[0] == "-":
        sys.stdout.write(text)
    else:
        out = Path(args[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
