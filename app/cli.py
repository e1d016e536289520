"""The `vkmmu` console script: `vkmmu serve --host --port`, `vkmmu migrate`, `vkmmu gc`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from app.config import Settings

# The exit status of a command given bad arguments or settings (as argparse uses).
EXIT_USAGE = 2
# Settings that also have a command-line option.
_OPTIONS = ("host", "port")


def _describe(e: ValidationError) -> str:
    """One line naming each bad setting the way the operator set it."""
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        where = f"VKMMU_{field.upper()}"
        if field in _OPTIONS:
            where = f"--{field} / {where}"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _serve(settings: Settings) -> int:
    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The app logs one structured line per request itself.
        access_log=False,
        # Keep the app's JSON logging: uvicorn's default config would add text handlers.
        log_config=None,
    )
    return 0


def _display_url(url: str) -> str:
    """The database URL with its password masked: the line may end up in a CI log."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        # Not a URL SQLAlchemy can parse, so it cannot be split: show none of it.
        return "the configured database"


def _migrate(settings: Settings) -> int:
    from app.services import lifecycle

    lifecycle.migrate(settings.database_url)
    print(f"database schema at head: {_display_url(settings.database_url)}")
    return 0


def _gc(settings: Settings) -> int:
    """One retention pass (what `vkmmu serve` also runs every VKMMU_GC_INTERVAL_S)."""
    import asyncio
    import json

    from app.services.vms import build_service, service_options

    async def run() -> dict[str, int]:
        svc = build_service(
            settings.database_url, **{**service_options(settings), "gc_interval_s": 0}
        )
        await svc.start()
        try:
            return await svc.gc()
        finally:
            await svc.stop()

    print(json.dumps(asyncio.run(run())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkmmu", description="The KVM x86 MMU over HTTP")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API (settings from VKMMU_* variables)")
    serve.add_argument("--host", default=None, help="listen address (VKMMU_HOST)")
    serve.add_argument("--port", type=int, default=None, help="listen port (VKMMU_PORT)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="bring the database schema up to date (Alembic)")
    migrate.set_defaults(func=_migrate)
    gc = sub.add_parser(
        "gc", help="reclaim storage: purge deleted VMs, prune journals behind snapshots"
    )
    gc.set_defaults(func=_gc)
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        k: v for k in _OPTIONS if (v := getattr(args, k, None)) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        # A setting out of range is the operator's mistake: say which, in one line.
        print(f"vkmmu: invalid settings: {_describe(e)}", file=sys.stderr)
        return EXIT_USAGE
    return int(args.func(settings))


if __name__ == "__main__":
    raise SystemExit(main())
