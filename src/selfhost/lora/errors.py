"""Errors a LoRA user or client can cause: an adapter that cannot be used, and slots that are all taken."""

from selfhost.errors import SelfhostError


class AdapterError(SelfhostError):
    """An adapter folder selfhost cannot read or apply to this base model."""


class AdapterSlotsBusyError(SelfhostError):
    """Every adapter slot is held by running requests, so another adapter cannot load now (retry later)."""
