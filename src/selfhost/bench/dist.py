"""Token-length distributions, written as short DIST strings on the command line.

Syntax (whitespace is ignored, lengths are in tokens and always >= 1):

    256               same as fixed:256
    fixed:256         every request gets 256
    uniform:64-512    integers drawn uniformly from 64..512, both ends included
    normal:256,64     Gaussian with mean 256 and standard deviation 64, rounded
                      and clipped to [1, mean + 4 * std] so a tail draw cannot
                      ask for an absurd length

Draws use a caller-owned `random.Random`, so a seed fixes every length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfhost.errors import InvalidParameterError

SYNTAX_HELP = "fixed:N, uniform:LO-HI or normal:MEAN,STD (e.g. fixed:256, uniform:64-512, normal:256,64)"


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths. `low`/`high` mean:
    fixed -> (n, n); uniform -> (lo, hi); normal -> (mean, std)."""

    kind: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.kind not in _PARSERS:
            raise InvalidParameterError(f"length distribution kind {self.kind!r} is not one of {sorted(_PARSERS)}")
        if self.kind == "normal":
            if self.low < 1 or self.high < 0:
                raise InvalidParameterError(f"normal:{self.low:g},{self.high:g} needs mean >= 1 and std >= 0")
        elif not (1 <= self.low <= self.high) or self.low != int(self.low) or self.high != int(self.high):
            raise InvalidParameterError(
                f"{self.kind}:{self.low:g}-{self.high:g} needs whole lengths with 1 <= low <= high"
            )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.low)
        if self.kind == "uniform":
            return rng.randint(int(self.low), int(self.high))
        mean, std = self.low, self.high
        return int(min(max(1, round(rng.gauss(mean, std))), round(mean + 4 * std)))

    @property
    def upper(self) -> int:
        """The longest length `sample` can return."""
        if self.kind == "normal":
            return int(round(self.low + 4 * self.high))
        return int(self.high)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.low)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.low)}-{int(self.high)}"
        return f"normal:{self.low:g},{self.high:g}"


def _parse_fixed(args: str) -> LengthDist:
    n = int(args)
    return LengthDist("fixed", n, n)


def _parse_uniform(args: str) -> LengthDist:
    low, high = args.split("-")
    return LengthDist("uniform", int(low), int(high))


def _parse_normal(args: str) -> LengthDist:
    mean, std = args.split(",")
    return LengthDist("normal", float(mean), float(std))


_PARSERS = {"fixed": _parse_fixed, "uniform": _parse_uniform, "normal": _parse_normal}


def parse_length_dist(text: str) -> LengthDist:
    """Parse a DIST string; a malformed one raises InvalidParameterError naming it."""
    spec = "".join(text.split()).lower()
    kind, sep, args = spec.partition(":")
    if not sep:
        kind, args = "fixed", spec
    parser = _PARSERS.get(kind)
    if parser is None:
        raise InvalidParameterError(f"length distribution {text!r} has unknown kind {kind!r}; use {SYNTAX_HELP}")
    try:
        return parser(args)
    except ValueError as err:
        if isinstance(err, InvalidParameterError):
            raise
        raise InvalidParameterError(f"cannot read length distribution {text!r}; use {SYNTAX_HELP}") from None
