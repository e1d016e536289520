"""`make bench`: run every benchmark script present under bench/, one process each.

The scripts print figures and assert nothing about time; a failing script (an exception, not
a slow run) makes this exit non-zero.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = (  # in this order; absent ones are skipped
    "engine.py",
    "persistence.py",
    "isolation.py",
    "replay.py",
    "mappings.py",
    "snapshot_memory.py",
    "trace.py",
    "tenants_load.py",
)


def main() -> int:
    status = 0
    for name in SCRIPTS:
        script = HERE / name
        if not script.exists():
            print(f"== {name}: not present, skipped", flush=True)
            continue
        print(f"\n######## bench/{name}", flush=True)
        rc = subprocess.run([sys.executable, str(script)], check=False).returncode
        if rc:
            print(f"== bench/{name} exited with {rc}", flush=True)
            status = rc
    return status


if __name__ == "__main__":
    sys.exit(main())
