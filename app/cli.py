"""The `vkmmu` console script: `vkmmu serve --host --port`, `vkmmu migrate`."""

from __future__ import annotations

import argparse

from app.config import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The app logs one structured line per request itself.
        access_log=False,
    )
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from app.services import lifecycle

    settings = Settings()
    lifecycle.migrate(settings.database_url)
    print(f"database schema at head: {settings.database_url}")
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
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
