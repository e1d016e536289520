"""The `vkmmu` console script: `vkmmu serve --host --port`, `vkmmu migrate`, `vkmmu top`,
`vkmmu replay`, `vkmmu compare`, `vkmmu demo`, `vkmmu gc`, `vkmmu token`, `vkmmu --version`."""

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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# Seconds a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
SWITCH_INTERVAL_S = 0.001


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.http_server import header_limited
    from app.main import create_app

    if not settings.auth_enabled() and not is_loopback(settings.host):
        print(
            f"vkmmu serve: refusing to listen on {settings.host}: without VKMMU_ADMIN_TOKEN "
            "the service is open (anyone who reaches it can create, read and delete every "
            "VM), so it only binds a loopback address (127.0.0.1, ::1, localhost). Set "
            "VKMMU_ADMIN_TOKEN to serve beyond this machine.",
            file=sys.stderr,
        )
        return EXIT_USAGE

    # A long engine call (an access of a TiB) holds the GIL between its numpy passes; other
    # threads (the event loop, other VMs' calls) get it back within this interval, not 5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # The header size limit kept by the parser, as the bytes arrive (431).
        http=header_limited(settings.max_header_bytes),
        log_level=settings.log_level.lower(),
        # The app logs one structured line per request itself.
        access_log=False,
        # Keep the app's JSON logging: uvicorn's default config would add text handlers.
        log_config=None,
    )
    _server(config, app).run()
    return 0


def _end_streams(app: Any) -> None:
    service = getattr(app.state, "service", None)
    if service is not None:
        service.events.close()


def _server(config: Any, app: Any) -> Any:
    """A uvicorn server that ends the event streams when its shutdown starts: uvicorn waits
    for open answers before the app's own shutdown runs, and a stream never ends by itself."""
    import uvicorn

    from app.http_server import tune_gc

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            tune_gc()  # the app, its routes and the service are built: all long-lived

        async def shutdown(self, sockets: Any = None) -> None:
            _end_streams(app)  # each stream sends `end {"reason": "shutdown"}` and closes
            await super().shutdown(sockets)

    return Server(config)


def _display_url(url: str) -> str:
    """The database URL with its password masked: the line may end up in a CI log."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        # Not a URL SQLAlchemy can parse, so it cannot be split: show none of it.
        return "the configured database"


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from app.services import lifecycle

    lifecycle.migrate(settings.database_url)
    print(f"database schema at head: {_display_url(settings.database_url)}")
    return 0


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vkmmu")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the README's tour against an in-process app, as tables")
    demo.add_argument("--no-color", action="store_true", help="plain text (also: NO_COLOR=1)")
    demo.set_defaults(func=_demo)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    # The demo uses its own throw-away database, never the configured one.
    from app import demo

    return demo.main(no_color=args.no_color)


def _top(settings: Settings, args: argparse.Namespace) -> int:
    import urllib.error

    from app.top import run

    url = args.url or f"http://{settings.host}:{settings.port}"
    token = args.token
    if token is None and settings.admin_token is not None:
        token = settings.admin_token.get_secret_value() or None
    try:
        return run(
            url,
            args.vm,
            interval=args.interval,
            once=args.once,
            max_vms=args.max_vms,
            token=token,
        )
    except urllib.error.HTTPError as e:
        hint = " (pass --token)" if e.code == 401 else ""
        print(f"vkmmu top: {url}: HTTP {e.code} {e.reason}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"vkmmu top: {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1


def _add_replay(sub: Any) -> None:
    """`vkmmu replay FILE` and `vkmmu compare TRACE` (app/replay_cli.py)."""
    from app.replay_cli import add_commands

    add_commands(sub)


def _add_batch(sub: Any) -> None:
    """`vkmmu batch FILE` (app/batch_cli.py)."""
    from app.batch_cli import add_command

    add_command(sub)


def _gc(settings: Settings, args: argparse.Namespace) -> int:
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


def _token(settings: Settings, args: argparse.Namespace) -> int:
    """`vkmmu token create|list|revoke`, on the database directly (no server needed)."""
    import json
    from datetime import UTC, datetime, timedelta

    from app.db.session import Database
    from app.services import lifecycle
    from app.services.tokens import TokenError, TokenStore

    lifecycle.migrate(settings.database_url)
    db = Database(settings.database_url)
    secret = settings.token_secret
    store = TokenStore(lambda: db, None if secret is None else secret.get_secret_value() or None)
    try:
        if args.action == "create":
            expires = None
            if args.expires_in is not None:
                expires = datetime.now(UTC) + timedelta(seconds=args.expires_in)
            scopes = ["read"] if args.read_only else None
            try:
                info, token = store.create(
                    args.tenant, scopes=scopes, expires_at=expires, label=args.label
                )
            except TokenError as e:
                print(f"vkmmu token create: {e}", file=sys.stderr)
                return EXIT_USAGE
            print(json.dumps({**info.to_json(), "token": token}))
            print("the token is shown this once: only its keyed hash is stored", file=sys.stderr)
        elif args.action == "list":
            for t in store.list(tenant=args.tenant):
                print(json.dumps(t.to_json()))
        else:
            found = store.revoke(args.id)
            if found is None:
                print(f"vkmmu token revoke: no token with id {args.id!r}", file=sys.stderr)
                return 1
            print(json.dumps(found.to_json()))
    finally:
        db.dispose()
    return 0


def _add_token(sub: Any) -> None:
    token = sub.add_parser("token", help="issue, list and revoke tenant tokens")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="issue a token (printed once, as JSON)")
    create.add_argument("--tenant", required=True, help="the tenant it acts for")
    create.add_argument("--read-only", action="store_true", help="scope `read` only")
    create.add_argument("--expires-in", type=float, default=None, help="seconds it stays valid")
    create.add_argument("--label", default=None, help="a name for people")
    listing = actions.add_parser("list", help="every token (never the tokens themselves)")
    listing.add_argument("--tenant", default=None, help="one tenant only")
    revoke = actions.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", help="the token's id (tok-…)")
    token.set_defaults(func=_token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkmmu", description="The KVM x86 MMU over HTTP")
    parser.add_argument("--version", action="version", version=f"vkmmu {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the API (settings from VKMMU_* variables)")
    serve.add_argument("--host", default=None, help="listen address (VKMMU_HOST)")
    serve.add_argument("--port", type=int, default=None, help="listen port (VKMMU_PORT)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="bring the database schema up to date (Alembic)")
    migrate.set_defaults(func=_migrate)
    _add_demo(sub)
    top = sub.add_parser("top", help="the MMU stats of a running service, like kvm_stat")
    top.add_argument("--url", default=None, help="the service (default http://VKMMU_HOST:PORT)")
    top.add_argument("--vm", default=None, help="one VM only (default: all, summed)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--max-vms", type=int, default=50, help="VMs summed, newest first")
    top.add_argument("--once", action="store_true", help="print one refresh and exit")
    top.add_argument(
        "--token",
        default=None,
        help="bearer token (a tenant's shows its VMs only; default: VKMMU_ADMIN_TOKEN if set)",
    )
    top.set_defaults(func=_top)
    _add_replay(sub)
    _add_batch(sub)
    gc = sub.add_parser(
        "gc", help="reclaim storage: purge deleted VMs, prune journals behind snapshots"
    )
    gc.set_defaults(func=_gc)
    _add_token(sub)
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
    return int(args.func(settings, args))


if __name__ == "__main__":
    raise SystemExit(main())
