"""Money: integer nano-USD (what prices, budgets and the ledger count in), the price table, what
a usage costs (cached prompt tokens at their own price), and exact decimal text. Shared below the
stages: a stage or observer that prices usage uses these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import nano_usd_per_token

if TYPE_CHECKING:
    from .config import Config
    from .schemas import Usage

NANO_PER_USD = 1_000_000_000

#: nano-USD per (prompt token, completion token, cached prompt token)
Price = tuple[int, int, int]
#: public model -> its price
Prices = dict[str, Price]


def price_table(cfg: Config) -> Prices:
    """The configured prices in nano-USD per token; models not listed have no price. A model
    without `cached_input_per_mtok` charges cached prompt tokens at the input price."""
    table: Prices = {}
    for model, p in cfg.prices.items():
        pin = nano_usd_per_token(p.input_per_mtok)
        cached = p.cached_input_per_mtok
        table[model] = (
            pin,
            nano_usd_per_token(p.output_per_mtok),
            pin if cached is None else nano_usd_per_token(cached),
        )
    return table


def cached_tokens(usage: Usage) -> int:
    """The prompt tokens the upstream served from its prompt cache (OpenAI's
    `prompt_tokens_details.cached_tokens`; Anthropic's `cache_read_input_tokens`, normalised into
    it by the adapter), at most the prompt: the one notion every price, budget and ledger uses."""
    details = usage.prompt_tokens_details
    if not details:  # UNSET and None are false
        return 0
    return min(max(details.cached_tokens or 0, 0), usage.prompt_tokens)


def usage_cost(usage: Usage, price: Price) -> int:
    """What a usage costs in nano-USD: uncached prompt tokens at the input price, cached ones at
    the cached price, completion tokens at the output price."""
    cached = cached_tokens(usage)
    return (usage.prompt_tokens - cached) * price[0] + cached * price[2] + usage.completion_tokens * price[1]


def usd_text(nano: int) -> str:
    """Exact decimal USD from nano-USD, no float on the way: `0.000123`, `1.5`, `0`, `-0.25`."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")
