"""The first fault of a fresh process imports nothing (issue 12: no first-call penalty).

numpy imports `numpy.ma` lazily inside the first `np.unique`, ~16 ms that landed on the
first fault of a fresh server; the engine imports it with itself instead. Run in a fresh
interpreter, since this test process has imported everything long ago.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_first_faults_of_a_fresh_process_import_no_module() -> None:
    script = textwrap.dedent(
        """
        import sys
        from app.engine import Vm
        from app.engine.ops import parse

        hva, size = 0x7F00_0000_0000, 64 << 30
        vm = Vm.create(0, 1)
        vm.apply(parse("set_user_memory_region", {"slot": 0, "flags": 0,
            "guest_phys_addr": 0, "memory_size": size, "userspace_addr": hva}))
        before = set(sys.modules)
        for gpa, n in ((0, 4096), (1 << 30, 4 << 30), (8 << 30, 2 << 20)):
            vm.apply(parse("access", {"vcpu": 0, "gpa": gpa, "size": n, "access": "write"}))
        vm.apply(parse("set_user_memory_region", {"slot": 0, "flags": 0,
            "guest_phys_addr": 0, "memory_size": 0, "userspace_addr": 0}))
        print(sorted(set(sys.modules) - before))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
