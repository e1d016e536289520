"""Service settings, read from `VKMMU_*` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VKMMU_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # SQLite file in the working directory by default; PostgreSQL by URL in production
    # (e.g. postgresql+psycopg://user@host/db).
    database_url: str = "sqlite+aiosqlite:///./vkmmu.db"
    # SQLite (WAL) commit durability: `normal` survives a killed process, `full` also a
    # power loss (every commit fsynced; slower writes). PostgreSQL ignores it.
    sqlite_synchronous: Literal["normal", "full"] = "normal"
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
    # What-if (POST …/what-if): variants and operations one request may ask for (422 past).
    whatif_max_variants: int = Field(default=8, ge=1, le=64)
    whatif_max_ops: int = Field(default=100_000, ge=1)
    log_level: str = "INFO"
    # The host's KVM module parameters every new VM gets (a VM's own `host` object at creation
    # overrides them): kvm_intel.pml, kvm.eager_page_split, kvm.nx_huge_pages, kvm.tdp_mmu.
    # The defaults are what vkmmu modelled before host profiles (docs/engine.md "Host profile").
    host_enable_pml: bool = False
    host_eager_page_split: bool = True
    host_nx_huge_pages: bool = False
    host_tdp_mmu: bool = True
    # Observability (docs/metrics.md): per-VM series on /metrics for at most this many VMs,
    # newest first; events buffered per stream client before it is dropped as too slow.
    metrics_max_vms: int = Field(default=100, ge=0)
    events_queue_max: int = Field(default=1024, ge=1)

    # --- reliability limits (README "Limits"): what one client can make the service hold ---
    # A VM is also snapshotted automatically once this much replay work piled up since its
    # last snapshot (bytes journaled + page-table and SPTE bytes built or torn down).
    snapshot_work_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # The request line and headers together (431 past it).
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    # Object keys plus array items in one JSON body, and its nesting depth (422 past them),
    # checked before validation.
    max_json_items: int = Field(default=10_000, ge=1)
    max_json_depth: int = Field(default=32, ge=1)
    # Retention: journal records kept behind each VM's newest snapshot (older ones are
    # pruned), seconds a deleted VM's row stays as a tombstone (its journal and snapshots go
    # at once), manual snapshots per VM (ENOMEM past it), seconds between background gc runs.
    journal_keep: int = Field(default=1000, ge=0)
    retention_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    max_manual_snapshots: int = Field(default=32, ge=0)
    gc_interval_s: float = Field(default=300.0, ge=0)
    # Memory a client can make the service hold (page tables, dirty bitmaps, host-memory and
    # guest_memfd contents, zap events): all VMs together, and each VM. A call reserves its
    # worst case first; past either it answers ENOMEM (507) and changes nothing.
    memory_budget_bytes: int = Field(default=8 * 1024**3, ge=0)
    vm_memory_budget_bytes: int = Field(default=4 * 1024**3, ge=0)
    # The largest guest_memfd KVM_CREATE_GUEST_MEMFD may create here (ENOMEM past it).
    max_guest_memfd_bytes: int = Field(default=1024**4, ge=4096)
    # Regions one POST …/memslots/batch may carry (422 past it).
    max_batch: int = Field(default=1024, ge=1, le=65536)
    # kvmmmu trace records each loaded VM keeps for GET …/trace (56 bytes each, counted in
    # the memory budget); 0 turns tracing off.
    trace_records: int = Field(default=4096, ge=0, le=1_000_000)
    # Browser origins allowed to call the API (CORS), comma-separated, e.g.
    # "https://dash.example.org,http://localhost:3000"; "*" allows any; empty: none.
    cors_origins: str = ""

    # --- tenants and tokens (README "Security model") ---
    # The admin's bearer token. Unset: the service is open (every caller acts as the admin)
    # and `vkmmu serve` binds only a loopback address.
    admin_token: SecretStr | None = None
    # A token that may read /metrics only (for scrapers).
    metrics_token: SecretStr | None = None
    # The key tenant tokens are hashed with (HMAC-SHA256). Unset: a key created once and
    # kept in the database. Changing it makes every token issued before unusable.
    token_secret: SecretStr | None = None
    # Quotas of each tenant (calls made with a tenant token; the admin is bound only by the
    # service's budgets). Past one: 507 (VMs, snapshots, bytes) or 429 (rates, streams).
    tenant_max_vms: int = Field(default=100, ge=0)
    tenant_max_snapshots: int = Field(default=256, ge=0)
    tenant_page_table_bytes: int = Field(default=1024**3, ge=0)
    tenant_content_bytes: int = Field(default=1024**3, ge=0)
    tenant_max_streams: int = Field(default=4, ge=0)
    # Requests per second each tenant token may make (a bucket of as many, refilled
    # continuously); 0: no limit.
    token_rate_per_s: float = Field(default=100.0, ge=0)

    def auth_enabled(self) -> bool:
        return self.admin_token is not None and bool(self.admin_token.get_secret_value())

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
