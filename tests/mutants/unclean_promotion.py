"""Mutant: promotion never checks the in-sync set (walship before clean failover).

A follower that lacks writes another, unreachable follower acknowledged is promoted, and
those ``replicated`` writes are lost. ``walship verify --faults acker_down`` must catch it
(checks ``no_unclean_promotion`` and ``replicated_on_every_node``).
"""

from __future__ import annotations

from walship.node import Node


def _never_unclean(self: Node, views: object) -> None:
    return None  # the lie: "this candidate holds every replicated write"


Node._unclean_reason = _never_unclean  # type: ignore[assignment,method-assign]

if __name__ == "__main__":
    from walship.cli.main import main

    main()
