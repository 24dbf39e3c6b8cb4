"""Memory sizes as users write them, with one meaning everywhere selfhost reads one.

A size is a number with a byte unit: '16GB' (decimal: kB, MB, GB, TB, as vendors
quote memory), '512MiB' or '2GiB' (binary: KiB, MiB, GiB, TiB), or 'B' for bytes;
from Python, an int is a number of bytes. A bare number string ('16') is refused:
one reader takes it for bytes, the next for gigabytes. The one exception is where a
share of free memory is accepted (the engine's `kv_cache_memory`): there a bare
number in (0, 1], string or float, is that fraction of the memory free at load time.

A leaf module (stdlib only) so the engine, the server settings and the planner can
all import it.
"""

from __future__ import annotations

import re

from selfhost.errors import InvalidParameterError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")
SIZE_FORMS = "a size with a unit like '16GB', '512MiB' or '2GiB' (or an int number of bytes)"
FRACTION_FORM = "a bare number in (0, 1] for that share of free memory, like '0.3'"


def _invalid(what: str, value, forms: str) -> InvalidParameterError:
    return InvalidParameterError(f"{what}={value!r} is invalid: expected {forms}")


def parse_size(value: str | int, *, what: str = "memory") -> int:
    """Bytes of a size: '16GB' -> 16_000_000_000, '2GiB' -> 2_147_483_648, an int -> itself.

    Bare number strings, floats, zero and negative sizes raise InvalidParameterError
    naming `what`, the value and the accepted forms.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise _invalid(what, value, SIZE_FORMS)
    if isinstance(value, int):
        if value <= 0:
            raise InvalidParameterError(f"{what}={value!r} must be > 0 bytes")
        return value
    match = _SIZE.fullmatch(str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise _invalid(what, value, SIZE_FORMS)
    size = round(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidParameterError(f"{what}={value!r} must be > 0 bytes")
    return size


def parse_size_or_fraction(value: str | int | float, *, what: str = "memory") -> int | float:
    """A size in bytes (int, as `parse_size`), or a share of free memory (float in (0, 1]).

    The fraction is a Python float or a bare number string; anything else must be a size.
    """
    forms = f"{SIZE_FORMS}, or {FRACTION_FORM}"
    if isinstance(value, float):
        fraction = value
    elif isinstance(value, str) and _SIZE.fullmatch(value) and not _SIZE.fullmatch(value).group(2):
        fraction = float(value)
    else:
        try:
            return parse_size(value, what=what)
        except InvalidParameterError as err:
            raise _invalid(what, value, forms) from err
    if not 0 < fraction <= 1:
        raise _invalid(what, value, forms)
    return fraction

