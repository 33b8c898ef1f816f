"""The compositor's own offers that the filter hides from a VM client, and when to give them back.

Every host selection change (clipboard or primary) makes the compositor create a new offer
object on the connection of the focused client, and a host drag over a VM window makes one too.
The filter never shows them to the VM (SPEC §9.1 item 3), so no client will ever destroy them:
left alone, the compositor keeps one object per host selection change per connection, for as
long as the VM's program runs. So the filter destroys each upstream itself, as a client that
ignores an offer does, once the compositor has said what the offer is for (its ``selection``
event; a drag's ``enter``), since the compositor sends nothing about it after that.

A host drag's offer is the exception: wlroots (``data_offer_destroy``) *destroys the drag's
source*, cancelling the user's drag, when an offer still linked to the drag is destroyed, and it
unlinks the offer only when the drag enters another surface. So a drag's offer is kept until the
next drag offer arrives (by then it is unlinked, or its drag is over) or the drop.

This is bookkeeping only: the session (:mod:`vmsilo.wayland.session`) feeds it the hidden
offers and device events and sends the ``destroy`` requests it returns.
"""

from __future__ import annotations

from vmsilo.wayland.clipboard import KINDS, Kind

#: offer / device interface name → its selection kind
OFFER_KINDS: dict[str, Kind] = {k.offer: k for k in KINDS}
DEVICE_KINDS: dict[str, Kind] = {k.device: k for k in KINDS}
#: offers that may wait for their ``selection``/``enter`` (more: the oldest are destroyed; a
#: compositor announces an offer and names it at once)
MAX_HOST_OFFERS = 8


class HostOffers:
    """The hidden offers of one connection still alive in the compositor."""

    def __init__(self) -> None:
        self.live: dict[int, Kind] = {}  # compositor id → kind, in the order announced
        self.drag = 0  # the offer of a host drag over the client's surface (0: none)
        self.destroyed = 0  # how many were given back (for tests and logs)

    def announced(self, oid: int, kind: Kind) -> list[tuple[int, Kind]]:
        """The compositor made offer ``oid``; the offers to destroy now (beyond the cap)."""
        self.live[oid] = kind
        out = []
        while len(self.live) > MAX_HOST_OFFERS:
            oldest = next(o for o in self.live if o != self.drag)
            out.append(self._take(oldest))
        return out

    def device_event(self, iface: str, name: str, args: list[object]) -> list[tuple[int, Kind]]:
        """A (silenced) event of a device of the compositor's; the offers to destroy now."""
        kind = DEVICE_KINDS.get(iface)
        if kind is None:
            return []
        if name == "selection":
            keep = {self.drag}
        elif name == "enter" and len(args) == 5 and isinstance(args[4], int):
            self.drag = args[4]
            keep = {self.drag}
        elif name == "drop":
            keep = set()
        else:
            return []
        gone = [o for o, k in self.live.items() if k == kind and o not in keep]
        return [self._take(o) for o in gone]

    def _take(self, oid: int) -> tuple[int, Kind]:
        kind = self.live.pop(oid)
        if oid == self.drag:
            self.drag = 0
        self.destroyed += 1
        return oid, kind
