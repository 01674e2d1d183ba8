"""The base of every model on the wire between the operator and the trainer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    """Base for every wire model: camelCase aliases, unknown fields refused, defaults kept."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready camelCase dict (what goes into the CRD object or the ConfigMap)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
