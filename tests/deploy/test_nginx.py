"""The proxy config, checked by nginx itself (`nginx -t`) on a render for loopback."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import require
from tests.deploy.procs import NGINX_CONF, free_port, nginx_binary, nginx_test, render_nginx_conf


def test_render_changes_only_the_marked_lines(tmp_path: Path) -> None:
    shipped = NGINX_CONF.read_text().splitlines()
    rendered = render_nginx_conf(18080, [18001, 18002], tmp_path).splitlines()
    changed = [(a, b) for a, b in zip(shipped, rendered, strict=True) if a != b]
    assert all("# render:" in a or "/tmp/" in a for a, _ in changed), changed
    assert "listen 127.0.0.1:18080;" in [ln.strip() for ln in rendered]
    servers = [ln.split()[1] for ln in rendered if re.match(r"\s+server 127", ln)]
    assert servers == ["127.0.0.1:18001", "127.0.0.1:18002"]


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    binary = nginx_binary()
    require(binary is not None, "nginx (.ci/deps/nginx.sh)")
    assert binary is not None
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(free_port(), [free_port(), free_port()], tmp_path))
    done = nginx_test(binary, conf, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "syntax is ok" in done.stderr and "test is successful" in done.stderr


def test_nginx_rejects_a_broken_config(tmp_path: Path) -> None:
    """`nginx -t` is a real check: the same render with the upstream block cut short fails."""
    binary = nginx_binary()
    require(binary is not None, "nginx (.ci/deps/nginx.sh)")
    assert binary is not None
    conf = tmp_path / "nginx.conf"
    text = render_nginx_conf(free_port(), [free_port(), free_port()], tmp_path)
    conf.write_text(text.replace("hash $vkmmu_route_key consistent;", "hash;"))
    done = nginx_test(binary, conf, tmp_path)
    assert done.returncode != 0
    assert "hash" in done.stderr
