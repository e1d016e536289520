"""`vkmmu batch FILE`: many memslot changes onto a VM of a running service, a batch at a time
(`POST /v1/vms/{vm}/memslots/batch`), stopping at the first call KVM rejects."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_REJECTED, EXIT_USAGE = 1, 2


def add_command(sub: Any) -> None:
    b = sub.add_parser(
        "batch", help="apply memslot changes (KVM_SET_USER_MEMORY_REGION2) in batches"
    )
    b.add_argument(
        "file",
        help='JSON: a list of regions, {"regions": [...]}, or one region per line; - for stdin. '
        "A region is the memslot PUT body plus `slot`.",
    )
    b.add_argument("--vm", required=True, help="the VM id")
    b.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    b.add_argument(
        "--batch-size", type=int, default=1024, help="regions per request (≤ VKMMU_MAX_BATCH)"
    )
    b.add_argument(
        "--token", default=os.environ.get("VKMMU_TOKEN"), help="bearer token (VKMMU_TOKEN)"
    )
    b.set_defaults(func=batch_command)


def read_regions(text: str) -> list[dict[str, Any]]:
    """A JSON list, an object with `regions`, or JSON lines."""
    text = text.strip()
    if not text:
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(doc, dict):
        doc = doc.get("regions", [doc])
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise ValueError("expected a list of region objects")
    return doc


def batches(regions: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(regions), size):
        yield regions[i : i + size]


def batch_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        regions = read_regions(raw)
    except (OSError, ValueError) as e:
        print(f"vkmmu batch: {args.file}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.batch_size < 1:
        print("vkmmu batch: --batch-size must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    applied = 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        for part in batches(regions, args.batch_size):
            try:
                r = client.post(f"/v1/vms/{args.vm}/memslots/batch", json={"regions": part})
            except httpx.HTTPError as e:
                print(f"vkmmu batch: {args.url}: {e}", file=sys.stderr)
                return EXIT_REJECTED
            if r.status_code != 200:
                print(f"vkmmu batch: HTTP {r.status_code}: {r.text[:500]}", file=sys.stderr)
                return EXIT_REJECTED
            body = r.json()
            applied += body["applied"]
            print(f"applied {applied}/{len(regions)}", file=sys.stderr)
            bad = next((x for x in body["results"] if x["outcome"] == "rejected"), None)
            if bad is not None:
                print(
                    json.dumps(
                        {
                            "applied": applied,
                            "rejected": bad,
                            "not_attempted": len(regions) - applied - 1,
                        }
                    )
                )
                return EXIT_REJECTED
    print(json.dumps({"applied": applied, "rejected": None, "not_attempted": 0}))
    return 0
