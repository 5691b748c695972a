"""Money: integer nano-USD (what prices, budgets and the ledger count in), the price table, and
exact decimal text. Shared below the stages: a stage or observer that prices usage uses these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import nano_usd_per_token

if TYPE_CHECKING:
    from .config import Config

NANO_PER_USD = 1_000_000_000

#: public model -> (nano-USD per prompt token, nano-USD per completion token)
Prices = dict[str, tuple[int, int]]


def price_table(cfg: Config) -> Prices:
    """The configured prices in nano-USD per token; models not listed have no price."""
    return {
        model: (nano_usd_per_token(p.input_per_mtok), nano_usd_per_token(p.output_per_mtok))
        for model, p in cfg.prices.items()
    }


def usd_text(nano: int) -> str:
    """Exact decimal USD from nano-USD, no float on the way: `0.000123`, `1.5`, `0`, `-0.25`."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")
