"""TypeScript types from openapi/openapi.json (openapi-typescript) and `tsc --strict` over a
client of the main flow (tests/sdk/ts/client.ts): a spec that types answers `unknown` or
drops a field fails here. npm packages come from the committed package-lock.json."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

TS = Path(__file__).resolve().parent / "ts"
SPEC = TS.parents[2] / "openapi" / "openapi.json"


def _npm_ci() -> None:
    if (TS / "node_modules" / ".bin" / "tsc").exists():
        return
    run = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=TS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_typescript_client_type_checks_strictly() -> None:
    require(shutil.which("node") is not None and shutil.which("npm") is not None, "Node and npm")
    _npm_ci()
    (TS / "build").mkdir(exist_ok=True)
    gen = subprocess.run(
        [
            str(TS / "node_modules" / ".bin" / "openapi-typescript"),
            str(SPEC),
            "-o",
            str(TS / "build" / "schema.d.ts"),
            # A field with a default is optional in a request body.
            "--default-non-nullable",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stdout + gen.stderr
    # client.ts uses answer fields as numbers, strings and unions: a field typed `unknown`
    # or missing from the spec is a type error there.
    tsc = subprocess.run(
        [str(TS / "node_modules" / ".bin" / "tsc"), "-p", str(TS / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr
