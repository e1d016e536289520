"""`make mutate`: mutation testing of app/engine with mutmut, bounded in time.

Copies app/engine with the engine and property tests into build/mutation (git-ignored), runs
`mutmut run` there for at most --budget seconds, and writes what it found like a benchmark:
bench/mutation.json (counts per module, the score, every survivor with its diff) and
bench/mutation.md (the same as tables). Not a CI gate: it prints figures and exits 0 unless
mutmut itself could not run.

A survivor is either killed by a new test or listed in bench/mutation_equivalent.json with the
reason it cannot be killed (an equivalent mutant: the program behaves the same). An entry names
the mutant and the mutated line it was written for, so an entry left stale by an engine change
stops matching and the survivor shows up as unexplained again.

mutmut only runs, for each mutant, the tests that executed its function in a first clean run
(a function no engine or property test reaches is "no tests": give it a test). The default run
is sized to check every mutant of its three modules within its budget on two cores:
- tests run fastest first (FASTEST_FIRST below) under pytest -x, so a killed mutant costs about
  one engine test instead of the property machines a random order often starts with;
- a wall timeout of 5x the mutant's estimate (mutmut's default 15x let a looping mutant hold a
  core for minutes; 2x timed out equivalent mutants whose property machines ran slower under
  load, counting them as killed);
- a 3000 s budget: a survivor still runs every test that reaches its function (about 40 s of a
  core when that includes the property machines), and about 90 survivors, most of them listed
  equivalents, take most of the run. A run that stops at the budget says how many mutants it
  never checked. --only narrows a run to mutmut name globs (`app.engine.dirty.x_rearm*`) and
  keeps its report in build/mutation.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
OUT_JSON = ROOT / "bench" / "mutation.json"
OUT_MD = ROOT / "bench" / "mutation.md"
EQUIVALENT = ROOT / "bench" / "mutation_equivalent.json"
TESTS = ("tests/engine", "tests/property")
ALL_MODULES = {p.stem for p in (ROOT / "app" / "engine").glob("*.py") if p.stem != "__init__"}
# The default run, sized for about 45 minutes on two cores: dirty logging (the split budget
# stop and CLEAR_DIRTY_LOG's ranges, two of the mutations that once survived), the S-EPT
# bookkeeping of a TD and the address helpers. `--modules all` mutates every module of
# app/engine (about 9,400 mutants: hours on two cores).
DEFAULT_MODULES = ("dirty", "tdx", "addr")

# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code), for reading its .meta files.
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    2: "interrupted",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "caught by type check",
    -11: "segfault",
    -9: "segfault",
}

CONFIG = """\
[tool.mutmut]
source_paths = ["app/engine"]
only_mutate = {only}
also_copy = ["app/__init__.py"]
pytest_add_cli_args_test_selection = {tests}
# test_structure checks the source layout (mutmut's trampolines change it), not behaviour.
pytest_add_cli_args = [
  "-p", "no:cacheprovider", "-q", "-x", "--ignore=tests/engine/test_structure.py",
]
use_git_change_detection = false
# A mutant's tests get (estimate + 2 s) x 5 of wall time (twice that of CPU) before they count
# as a timeout: a survivor that runs the property machines takes about twice its estimate
# with two workers on two cores, and mutmut's default (x 15) lets a looping mutant hold a
# core for five minutes.
timeout_multiplier = 5.0
timeout_constant = 2.0

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""


# Appended to the copied tests/conftest.py. mutmut hands each mutant its tests as an unordered
# set and pytest runs them in that order with -x; run them fastest first (the durations of
# mutmut's own clean run) so that a killed mutant is usually killed by a sub-second engine test
# before a property machine (seconds each) starts. Survivors run everything either way.
FASTEST_FIRST = """

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import json
    from pathlib import Path

    stats = Path("mutmut-stats.json")  # mutmut runs the tests in build/mutation/mutants
    if not stats.exists():
        return
    took = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: took.get(item.nodeid, 0.0))
"""


def prepare(fresh: bool, modules: list[str]) -> None:
    """The tree mutmut works in: app/engine, the tests that exercise it, a config."""
    if fresh and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sub in ("app/engine", *TESTS):
        dst = WORK / sub
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / sub, dst, ignore=ignore)
    for f in ("app/__init__.py", "tests/__init__.py", "tests/conftest.py"):
        shutil.copy2(ROOT / f, WORK / f)
    with (WORK / "tests" / "conftest.py").open("a") as f:
        f.write(FASTEST_FIRST)
    only = [f"app/engine/{m}.py" for m in modules]
    (WORK / "pyproject.toml").write_text(
        CONFIG.format(tests=json.dumps(list(TESTS)), only=json.dumps(only))
    )


def run_mutmut(budget: float, children: int, only: list[str]) -> tuple[float, bool, int]:
    """mutmut run in its own process group; on the budget, interrupt it (results so far stay
    in its .meta files). Returns (seconds, finished, exit code)."""
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(children), *only]
    t0 = time.monotonic()
    log = (WORK / "mutmut.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=WORK, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        rc = proc.wait(timeout=budget)
        return time.monotonic() - t0, True, rc
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return time.monotonic() - t0, False, proc.returncode
    finally:
        log.close()


def read_results() -> dict[str, str]:
    """mutant name -> status, from mutmut's per-file .meta files."""
    out: dict[str, str] = {}
    for meta in sorted((WORK / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            out[name] = "not checked" if code is None else STATUS.get(code, "suspicious")
    return out


def mutant_diffs(names: list[str]) -> dict[str, str]:
    """The diff of each mutant against its original, read straight from mutmut's generated
    files (each mutant is a function `<name>__mutmut_<n>` beside `<name>__mutmut_orig`);
    `mutmut show` takes seconds per mutant."""
    by_file: dict[Path, list[str]] = {}
    for n in names:
        path = WORK / "mutants" / (module_of(n).replace(".", "/") + ".py")
        by_file.setdefault(path, []).append(n)
    out: dict[str, str] = {}
    for path, group in by_file.items():
        lines = path.read_text().splitlines()
        # By line numbers: ast.get_source_segment rescans the file for every function.
        funcs = {
            node.name: lines[node.lineno - 1 : node.end_lineno]
            for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        for n in group:
            short = n.rsplit(".", 1)[1]
            orig = short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
            # Both under the function's own name: the def line is in the diff only when the
            # mutation is there (a changed default).
            plain = f"def {function_of(n).rsplit('.', 1)[-1]}("
            a = [x.replace(f"def {orig}(", plain) for x in funcs.get(orig, [])]
            b = [x.replace(f"def {short}(", plain) for x in funcs.get(short, [])]
            diff = difflib.unified_diff(a, b, lineterm="", n=1)
            out[n] = "\n".join(x for x in diff if not x.startswith(("---", "+++")))
    return out


def mutated_line(diff: str) -> str:
    """The mutant's new line(s), stripped: what an equivalence entry was written for."""
    plus = [
        x[1:].strip() for x in diff.splitlines() if x.startswith("+") and not x.startswith("++")
    ]
    return " | ".join(plus)


def module_of(name: str) -> str:
    # app.engine.dirty.x_split_huge__mutmut_3 -> app.engine.dirty
    return name.split(".x")[0].rsplit(".", 1)[0] if ".x" not in name else name.split(".x")[0]


def function_of(name: str) -> str:
    m = re.search(r"\.x[ǁ_]?(.*)__mutmut_\d+$", name)
    return (m.group(1) if m else name).replace("ǁ", ".").strip(".")


def load_equivalent() -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Named equivalent mutants, and the reasons of the rule-based classes."""
    if not EQUIVALENT.exists():
        return {}, {}
    data = json.loads(EQUIVALENT.read_text())
    return {e["name"]: e for e in data.get("mutants", [])}, data.get("classes", {})


# String literals (f-strings too: the detail often names the value) and None.
_LITERAL = re.compile(r"(?<!\w)f?\"[^\"]*\"|(?<!\w)f?'[^']*'|\bNone\b")


def rejection_detail_only(diff: str) -> bool:
    """A one-line mutant that changes only the text of a rejection (the string given to
    einval/KvmError/an order error, or None instead of it): the errno and the state are the
    contract, the wording is not."""
    minus = [x[1:] for x in diff.splitlines() if x.startswith("-") and not x.startswith("--")]
    plus = [x[1:] for x in diff.splitlines() if x.startswith("+") and not x.startswith("++")]
    if len(minus) != 1 or len(plus) != 1 or "raise " not in minus[0]:
        return False
    return _LITERAL.sub("S", minus[0]) == _LITERAL.sub("S", plus[0])


def summarise(
    results: dict[str, str], elapsed: float, finished: bool, budget: float, modules: list[str]
) -> dict[str, Any]:
    equivalent, classes = load_equivalent()
    per_module: dict[str, Counter[str]] = {}
    for name, status in results.items():
        per_module.setdefault(module_of(name), Counter())[status] += 1
    survivors = []
    names = sorted(n for n, s in results.items() if s in ("survived", "suspicious"))
    # Always from this run's mutants: a name from an earlier run may stand for another mutant
    # once its function has changed.
    diffs = mutant_diffs(names)
    for name in names:
        diff = diffs[name]
        line = mutated_line(diff)
        entry = equivalent.get(name)
        reason = entry["reason"] if entry and entry.get("mutated_line") == line else None
        if reason is None and rejection_detail_only(diff):
            reason = classes.get("rejection_detail")
        survivors.append(
            {
                "name": name,
                "module": module_of(name),
                "function": function_of(name),
                "status": results[name],
                "mutated_line": line,
                "diff": diff,
                "equivalent": reason,
            }
        )
    total = Counter(results.values())
    killed = total["killed"] + total["timeout"] + total["caught by type check"]
    checked = killed + total["survived"] + total["suspicious"]
    unexplained = [s["name"] for s in survivors if s["equivalent"] is None]
    explained = len(survivors) - len(unexplained)
    return {
        "tool": f"mutmut {_mutmut_version()}",
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "scope": {
            "modules": [f"app/engine/{m}.py" for m in modules],
            "of": len(ALL_MODULES),
            "tests": list(TESTS),
        },
        "budget_s": budget,
        "elapsed_s": round(elapsed),
        "finished": finished,
        "cpus": os.cpu_count(),
        "mutants": len(results),
        "checked": checked,
        "not_checked": total["not checked"] + total["interrupted"],
        "counts": dict(sorted(total.items())),
        # killed / checked; equivalent survivors excluded from the denominator in the second.
        "score": round(killed / checked, 4) if checked else None,
        "score_without_equivalent": round(killed / (checked - explained), 4)
        if checked - explained
        else None,
        "per_module": {m: dict(sorted(c.items())) for m, c in sorted(per_module.items())},
        "survivors": survivors,
        "unexplained_survivors": unexplained,
    }


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def write_markdown(s: dict[str, Any]) -> str:
    pct = "n/a" if s["score"] is None else f"{100 * s['score']:.1f} %"
    pct2 = (
        "n/a"
        if s["score_without_equivalent"] is None
        else f"{100 * s['score_without_equivalent']:.1f} %"
    )
    out = [
        "# Mutation testing of app/engine",
        "",
        f"Written by `make mutate` (bench/mutation.py, {s['tool']}) at {s['measured_at']}, "
        f"{s['cpus']} CPUs; tests: {', '.join(s['scope']['tests'])}; "
        f"modules mutated: {len(s['scope']['modules'])} of {s['scope']['of']} "
        f"({', '.join(s['scope']['modules'])}).",
        "",
        f"- run: {s['elapsed_s']} s of a {s['budget_s']:.0f} s budget, "
        + ("finished" if s["finished"] else "**stopped at the budget**"),
        f"- mutants: {s['mutants']}, checked {s['checked']}, not checked {s['not_checked']}",
        f"- score (killed / checked): **{pct}**; "
        f"without the survivors listed as equivalent: {pct2}",
        f"- survivors: {len(s['survivors'])}, of which unexplained: "
        f"**{len(s['unexplained_survivors'])}**",
        "",
        "| module | " + " | ".join(sorted(s["counts"])) + " |",
        "|---|" + "---:|" * len(s["counts"]),
    ]
    for mod, c in s["per_module"].items():
        out.append(f"| {mod} | " + " | ".join(str(c.get(k, 0)) for k in sorted(s["counts"])) + " |")
    out += ["", "## Survivors", ""]
    if not s["survivors"]:
        out.append("None.")
    for sv in s["survivors"]:
        why = sv["equivalent"] or "**unexplained**: needs a test or an equivalence reason"
        out += [
            f"### `{sv['name']}`",
            "",
            f"{sv['status']}; {why}",
            "",
            "```diff",
            sv["diff"],
            "```",
            "",
        ]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=3000, help="seconds for mutmut run")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--modules",
        nargs="*",
        default=list(DEFAULT_MODULES),
        help="app/engine module names to mutate ('all' for every one)",
    )
    ap.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="mutmut mutant-name globs to run and report, e.g. 'app.engine.dirty.x_rearm*'",
    )
    ap.add_argument("--keep", action="store_true", help="reuse build/mutation (resume a run)")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the last run"
    )
    ap.add_argument(
        "--elapsed", type=float, help="with --report-only: the seconds the run took, if known"
    )
    args = ap.parse_args()
    modules = sorted(ALL_MODULES) if args.modules == ["all"] else args.modules
    unknown = set(modules) - ALL_MODULES
    if unknown:
        ap.error(f"not modules of app/engine: {sorted(unknown)}")
    if args.report_only:
        elapsed, finished = 0.0, False
        prev = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
        elapsed, finished = prev.get("elapsed_s", 0.0), prev.get("finished", False)
        if args.elapsed is not None:
            elapsed, finished = args.elapsed, args.elapsed < args.budget
    else:
        prepare(fresh=not args.keep, modules=modules)
        elapsed, finished, rc = run_mutmut(args.budget, args.max_children, args.only)
        if finished and rc not in (0, None):
            print((WORK / "mutmut.log").read_text()[-4000:])
            print(f"mutmut exited with {rc}", file=sys.stderr)
    results = read_results()
    if args.only:
        results = {n: r for n, r in results.items() if any(fnmatch(n, g) for g in args.only)}
    if not results:
        print("mutmut produced no results; see build/mutation/mutmut.log", file=sys.stderr)
        return 1
    summary = summarise(results, elapsed, finished, args.budget, modules)
    # A narrowed run is for working on some mutants: its report stays in build/mutation.
    out_json, out_md = (
        (WORK / OUT_JSON.name, WORK / OUT_MD.name) if args.only else (OUT_JSON, OUT_MD)
    )
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    out_md.write_text(write_markdown(summary))
    print(
        f"mutants {summary['mutants']}, checked {summary['checked']}, "
        f"not checked {summary['not_checked']}, score {summary['score']}, "
        f"survivors {len(summary['survivors'])} "
        f"(unexplained {len(summary['unexplained_survivors'])}); "
        f"{'finished' if finished else 'stopped at the budget'} after {summary['elapsed_s']} s"
    )
    print(f"wrote {out_json.relative_to(ROOT)} and {out_md.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
