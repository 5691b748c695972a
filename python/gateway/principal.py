"""Who is calling: the value the `auth` stage puts on the context and later stages read."""

from __future__ import annotations

from .config import TierConfig


class Principal:
    """Who is calling: one per configured key, built once per worker and shared by requests."""

    __slots__ = ("digest", "disabled", "expires_at", "key_id", "models", "team", "tier", "tier_name")

    def __init__(
        self,
        key_id: str,
        digest: bytes,
        team: str,
        tier_name: str,
        tier: TierConfig,
        models: frozenset[str] | None,
        expires_at: float,
        disabled: bool,
    ) -> None:
        self.key_id = key_id
        self.digest = digest
        self.team = team
        self.tier_name = tier_name
        self.tier = tier
        #: allowed public models; None = all
        self.models = models
        #: Unix time the key stops working (inf: never)
        self.expires_at = expires_at
        self.disabled = disabled

    def __repr__(self) -> str:  # never the digest
        return f"Principal(key_id={self.key_id!r}, team={self.team!r}, tier={self.tier_name!r})"
