"""SpeculativeConfig: which proposer, and how many tokens it may propose per step."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.errors import InvalidParameterError

DRAFT_PREFIX = "draft:"


@dataclass(frozen=True)
class SpeculativeConfig:
    """`method`: "ngram" (prompt lookup, no second model) or "draft" (a smaller model with the
    same tokenizer, at `draft_model`: a folder, Hub id or catalog alias). `num_tokens`: the most
    tokens proposed per sequence and step (each sequence's own length adapts below it)."""

    method: str
    num_tokens: int = 4
    draft_model: str | None = None
    # A one-token match is kept ~1 time in 3 on the demo model, against ~2 in 3 for longer ones; its
    # proposals are still worth a token or two where a wider step costs little (adaptive.py decides).
    ngram_min: int = 1
    ngram_max: int = 4
    # "measured": propose only while this machine's measured step times say it pays (step_cost.py);
    # "always": whenever a sequence's adaptive length allows (tests that need speculation to happen
    # whatever the machine's speed; a deployment that knows it is bandwidth-bound).
    when: str = "measured"

    def __post_init__(self) -> None:
        if self.when not in ("measured", "always"):
            raise InvalidParameterError(f"speculative when={self.when!r}: choose 'measured' or 'always'",
                                        param="speculative")
        if self.method not in ("ngram", "draft"):
            raise InvalidParameterError(f"speculative={self.method!r}: choose 'ngram' or 'draft:PATH'",
                                        param="speculative")
        if self.method == "draft" and not self.draft_model:
            raise InvalidParameterError("speculative='draft:PATH' needs the draft model's path after 'draft:'",
                                        param="speculative")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise InvalidParameterError(f"num_speculative_tokens={self.num_tokens!r} must be an integer >= 1",
                                        param="num_speculative_tokens")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidParameterError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.ngram_min}..{self.ngram_max}",
                                        param="speculative")

    @classmethod
    def parse(cls, spec: str | None, num_tokens: int = 4) -> SpeculativeConfig | None:
        """'ngram' or 'draft:PATH' (what `LLM(speculative=...)` and `--speculative` take); None: off."""
        if spec is None or spec == "" or spec == "off":
            return None
        if spec.startswith(DRAFT_PREFIX):
            return cls("draft", num_tokens, draft_model=spec[len(DRAFT_PREFIX):])
        return cls(spec, num_tokens)
