"""What a resumed run takes from its checkpoint's training state, at any world size.

The data order is fixed by the run's partitions (``kdcache.trainer.data``): a resume uses the
checkpoint's, whatever the world size and workers now; the step budget is the one the learning
rate schedule was built for. Only the RNG streams and the global batch depend on the world size.
"""

from __future__ import annotations

from typing import Any

from kdcache.cache.errors import ConfigError


def saved_partitions(state: dict[str, Any]) -> int:
    """The data partitions of the run that wrote ``state`` (a ``trainer_state.pt`` dict)."""
    cursor = state["data"][0]
    if "partitions" in cursor:
        return int(cursor["partitions"])
    return int(cursor["world_size"]) * int(cursor["num_streams"])  # before partitions existed


def partitions_for(requested: int | None, state: dict[str, Any] | None) -> int | None:
    """The partitions to build the dataset with: the checkpoint's on resume, else the flag's."""
    if state is None:
        return requested
    saved = saved_partitions(state)
    if requested is not None and requested != saved:
        raise ConfigError(
            f"--data-partitions {requested}: the run being resumed has {saved}; leave it out"
        )
    return saved


def rng_for_rank(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s saved RNG state; at another world size, that of rank ``rank % saved``."""
    states = state["rng"]
    return states[rank % len(states)]


def world_size_note(
    state: dict[str, Any], world_size: int, batch_size: int, accum: int
) -> str | None:
    """One line when the world size changed since the checkpoint (None when it did not)."""
    saved_world = len(state["data"])
    if saved_world == world_size:
        return None
    saved = state.get("config", {})
    before = (
        saved_world * int(saved.get("batch_size", batch_size)) * int(saved.get("grad_accum", accum))
    )
    now = world_size * batch_size * accum
    line = (
        f"resuming a {saved_world}-rank checkpoint on {world_size} rank(s): the data continues "
        f"from the saved cursors, each remaining sequence of the epoch once"
    )
    if before == now:
        return f"{line}; global batch {now} sequences, as before"
    hint = ""
    if (before // batch_size) % world_size == 0 and before % batch_size == 0:
        hint = f" (--grad-accum {before // batch_size // world_size} keeps it)"
    return f"{line}; the global batch changes from {before} to {now} sequences{hint}"
