"""Turn an unknown name into an error that suggests the names the user may have meant."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from selfhost.errors import InvalidParameterError


def unknown_name_error(kind: str, name: str, known: Iterable[str]) -> InvalidParameterError:
    """Build the error for `name` missing from `known`, naming up to three close matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    # get_close_matches works on the lowered names; map back to the catalog spelling.
    by_lower = {k.lower(): k for k in known}
    if close:
        hint = "did you mean " + ", ".join(repr(by_lower[c]) for c in close) + "?"
    else:
        hint = "known: " + ", ".join(known)
    return InvalidParameterError(f"unknown {kind} {name!r}; {hint}")
