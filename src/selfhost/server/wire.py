"""What every API's wire models share: lenient parsing, the seed range, the stop-string cap, ids."""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from selfhost.sampling_params import SEED_MAX, SEED_MIN

# A seed torch can take; outside it a 400, not the generator's OverflowError.
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
# Stop strings per request, on every route: each is checked against every new token's text.
MAX_STOP_STRINGS = 16


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")
