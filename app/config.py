"""Service settings, read from `VKMMU_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VKMMU_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # SQLite file in the working directory by default; PostgreSQL by URL in production
    # (e.g. postgresql+psycopg://user@host/db).
    database_url: str = "sqlite+aiosqlite:///./vkmmu.db"
    # A snapshot is taken automatically every N journal records of a VM (bounds replay time).
    snapshot_every: int = Field(default=1000, ge=1)
    # Request bodies above this many bytes are refused with 413 before they are parsed.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    # Page-table memory the whole service may spend: all loaded VMs together, not each VM.
    # A call that could need more tables than are left (the worst case for its range) answers
    # ENOMEM (507) before allocating; eager page splitting stops at the budget; calls running
    # at once on different VMs may overshoot by what they allocate at that moment.
    page_table_budget_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=0)
    # VMs held in memory at once; past it the least recently used idle ones are evicted
    # (they reload from their newest snapshot and the journal on next use).
    max_loaded_vms: int = Field(default=64, ge=1)
    log_level: str = "INFO"
    # Browser origins allowed to call the API (CORS), comma-separated, e.g.
    # "https://dash.example.org,http://localhost:3000"; "*" allows any; empty: none.
    cors_origins: str = ""

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
