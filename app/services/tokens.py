"""Tenant API tokens: issued, listed, revoked, verified. Only keyed hashes are stored.

A token is `vkmmu_` + 43 URL-safe characters (256 random bits). The database keeps
HMAC-SHA256(key, token): with the key out of the database (`VKMMU_TOKEN_SECRET`) a copy of
the database lets nobody find or check a token. Without that setting the key is created
once and kept in the `auth_keys` table (every process on the database shares it); setting
`VKMMU_TOKEN_SECRET` later makes the tokens issued before unusable.

Verification looks the hash up by its unique index. Answers are cached for
`CACHE_S` seconds per process; a revocation takes effect at once in the process that
revoked, within `CACHE_S` in the others.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import AuthKeyRow, TokenRow, utcnow
from app.db.session import Database

TOKEN_PREFIX = "vkmmu_"
SCOPES = ("read", "write")
DEFAULT_SCOPES = ("read", "write")
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_TENANT_RE = re.compile(TENANT_PATTERN)
CACHE_S = 5.0
_KEY_NAME = "token-hmac"


class TokenError(ValueError):
    """A token request that is not acceptable (bad tenant name, scope, expiry)."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    tenant: str
    scopes: tuple[str, ...]
    label: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "label": self.label,
            "created_at": _iso(self.created_at),
            "expires_at": None if self.expires_at is None else _iso(self.expires_at),
            "revoked_at": None if self.revoked_at is None else _iso(self.revoked_at),
        }

    def live(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def _aware(dt: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were stored in UTC.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return _aware(dt).astimezone(UTC).isoformat().replace("+00:00", "Z")


def _info(row: TokenRow) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        tenant=row.tenant,
        scopes=tuple(row.scopes.split()),
        label=row.label,
        created_at=_aware(row.created_at),
        expires_at=None if row.expires_at is None else _aware(row.expires_at),
        revoked_at=None if row.revoked_at is None else _aware(row.revoked_at),
    )


def check_tenant(tenant: str) -> str:
    if not _TENANT_RE.match(tenant):
        raise TokenError(
            "a tenant name is 1-63 lower-case letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return tenant


def check_scopes(scopes: Sequence[str] | None) -> tuple[str, ...]:
    if scopes is None:
        return DEFAULT_SCOPES
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown or not wanted:
        raise TokenError(f"scopes are a non-empty subset of {list(SCOPES)}; got {sorted(wanted)}")
    # "write" without "read" would be a token that can change what it cannot see.
    wanted.add("read")
    return tuple(s for s in SCOPES if s in wanted)


class TokenStore:
    """Tokens in the service's database (`db` is called for the `Database` each time: the
    service opens it when it starts)."""

    def __init__(self, db: Callable[[], Database], secret: str | None = None) -> None:
        self._db = db
        self._secret = secret.encode() if secret else None
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, TokenInfo | None]] = {}

    # ------------------------------------------------------------ hashing

    def _hmac_key(self) -> bytes:
        if self._secret is not None:
            return self._secret
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = self._stored_key()
        return self._key

    def _stored_key(self) -> bytes:
        try:
            with self._db().write() as s:
                row = s.get(AuthKeyRow, _KEY_NAME)
                if row is None:
                    row = AuthKeyRow(name=_KEY_NAME, key=secrets.token_hex(32), created_at=utcnow())
                    s.add(row)
                return bytes.fromhex(row.key)
        except IntegrityError:  # another process created it first: use theirs
            with self._db().read() as s:
                found = s.get(AuthKeyRow, _KEY_NAME)
                assert found is not None
                return bytes.fromhex(found.key)

    def digest(self, token: str) -> str:
        return hmac.new(self._hmac_key(), token.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------ issuing

    def create(
        self,
        tenant: str,
        *,
        scopes: Sequence[str] | None = None,
        expires_at: datetime | None = None,
        label: str | None = None,
    ) -> tuple[TokenInfo, str]:
        """A new token for `tenant`: (its record, the token, which is never stored)."""
        check_tenant(tenant)
        granted = check_scopes(scopes)
        now = utcnow()
        if expires_at is not None:
            expires_at = _aware(expires_at)
            if expires_at <= now:
                raise TokenError("expires_at is in the past")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = TokenRow(
            id=f"tok-{int(time.time() * 1000):012x}{secrets.token_hex(5)}",
            tenant=tenant,
            scopes=" ".join(granted),
            label=label,
            token_hash=self.digest(token),
            created_at=now,
            expires_at=expires_at,
            revoked_at=None,
        )
        with self._db().write() as s:
            s.add(row)
        return _info(row), token

    def list(self, *, tenant: str | None = None) -> list[TokenInfo]:
        with self._db().read() as s:
            stmt = select(TokenRow).order_by(TokenRow.id)
            if tenant is not None:
                stmt = stmt.where(TokenRow.tenant == tenant)
            return [_info(r) for r in s.execute(stmt).scalars().all()]

    def get(self, token_id: str) -> TokenInfo | None:
        with self._db().read() as s:
            row = s.get(TokenRow, token_id)
            return None if row is None else _info(row)

    def revoke(self, token_id: str) -> TokenInfo | None:
        """Revoke a token (idempotent); None when there is no such token."""
        with self._db().write() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                return None
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            info = _info(row)
        with self._lock:
            self._cache = {
                k: v for k, v in self._cache.items() if v[1] is None or v[1].id != token_id
            }
        return info

    # ------------------------------------------------------------ verifying

    def verify(self, token: str) -> TokenInfo | None:
        """The live token `token` is, or None (unknown, revoked, expired)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        digest = self.digest(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_S:
            info = hit[1]
        else:
            info = self._lookup(digest)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now, info)
        return info if info is not None and info.live(utcnow()) else None

    def _lookup(self, digest: str) -> TokenInfo | None:
        with self._db().read() as s:
            row = _by_hash(s, digest)
            return None if row is None else _info(row)


def _by_hash(s: Session, digest: str) -> TokenRow | None:
    return s.execute(select(TokenRow).where(TokenRow.token_hash == digest)).scalar_one_or_none()


__all__ = [
    "DEFAULT_SCOPES",
    "SCOPES",
    "TENANT_PATTERN",
    "TokenError",
    "TokenInfo",
    "TokenStore",
    "check_scopes",
    "check_tenant",
]
