"""Write the OpenAPI spec of `create_app()`: `python -m app.openapi_dump openapi/openapi.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def spec() -> dict[str, Any]:
    from app.main import create_app

    return create_app().openapi()


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
