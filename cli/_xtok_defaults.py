"""The defaults of a plain ``kdcache train --cross-tokenizer`` (issue 26).

docs/QUALITY.md "Cross-tokenizer pure KD": chunk likelihoods plus the exact-match term, the
teacher's unmatched tokens mapped to their first student token, FKL, no ULD, no CE: the setting
measured best as pure KD (it beat CE only on every seed of both students). A cache without the
observed-token column (format 1, ``--no-observed-logprobs``) cannot train chunk likelihoods: it
falls back to the exact-match target with 0.5 CE (issue 26's table: as pure KD it lost to CE
only), said in one line. Each objective chosen explicitly gets its own defaults below; an option
the user gives always wins.
"""

from __future__ import annotations

from typing import Any

import typer

XTOK_DEFAULT_LOSS = "alm+exact"  # --xtok-loss of a cache with observed-token log-probs
XTOK_FALLBACK_LOSS = "exact"  # ... of a cache without them
# per --xtok-loss: the defaults of the options the user left out
XTOK_OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "alm+exact": {"loss": "fkl", "uld_weight": 0.0, "vocab_map": "prefix", "ce_weight": 0.0},
    "alm": {"loss": "fkl", "uld_weight": 0.0, "vocab_map": "prefix", "ce_weight": 0.5},
    # issue 17's measured defaults of the exact-match target (docs/QUALITY.md)
    "exact": {"loss": "akl", "uld_weight": 1.0, "vocab_map": "exact", "ce_weight": 0.5},
}


def cache_has_observed_logprobs(cache: str, reader: dict[str, Any]) -> bool:
    """Whether the cache at ``cache`` stores the observed-token column (``reader``: open_cache
    keywords of a URL cache). Reads the manifest only (the trainer opens the cache itself)."""
    from kdcache.cache.format.manifest import read_manifest
    from kdcache.cache.storage.location import resolve_location
    from kdcache.cache.storage.remote_cache import read_remote_manifest

    location = resolve_location(cache, reader.get("storage_options"))
    if location.is_remote:
        manifest, _ = read_remote_manifest(location)
    else:
        manifest = read_manifest(location.local_path)
    return bool(manifest.get("observed_logprobs"))


def cross_tokenizer_defaults(
    cache: str, given: dict[str, Any], reader: dict[str, Any]
) -> dict[str, Any]:
    """``given`` (loss, xtok_loss, uld_weight, vocab_map, ce_weight; None = left out) with the
    left-out ones filled in for a --cross-tokenizer run on ``cache``."""
    resolved = dict(given)
    if resolved["xtok_loss"] is None:
        if cache_has_observed_logprobs(cache, reader):
            resolved["xtok_loss"] = XTOK_DEFAULT_LOSS
        else:
            resolved["xtok_loss"] = XTOK_FALLBACK_LOSS
            fallback = XTOK_OBJECTIVE_DEFAULTS[XTOK_FALLBACK_LOSS]
            typer.echo(
                f"note: {cache} stores no observed-token log-probs (built before format 2 or with "
                f"--no-observed-logprobs): --cross-tokenizer trains --xtok-loss "
                f"{XTOK_FALLBACK_LOSS} with --ce-weight {fallback['ce_weight']}; rebuild the "
                f"cache for the default --xtok-loss {XTOK_DEFAULT_LOSS} (pure KD)"
            )
    defaults = XTOK_OBJECTIVE_DEFAULTS.get(resolved["xtok_loss"], {})  # unknown: refused later
    for name, value in defaults.items():
        if resolved.get(name) is None:
            resolved[name] = value
    return resolved


def help_text() -> str:
    """The defaults in words, for ``--help``."""
    best = XTOK_OBJECTIVE_DEFAULTS[XTOK_DEFAULT_LOSS]
    fallback = XTOK_OBJECTIVE_DEFAULTS[XTOK_FALLBACK_LOSS]
    return (
        f"(default: {XTOK_DEFAULT_LOSS} with --loss {best['loss']} --uld-weight "
        f"{best['uld_weight']:g} --vocab-map {best['vocab_map']} --ce-weight "
        f"{best['ce_weight']:g}: pure KD; on a cache without observed log-probs "
        f"{XTOK_FALLBACK_LOSS} with --ce-weight {fallback['ce_weight']:g})."
    )
