"""What every model-config section shares: strict frozen models and the datatype check."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kernelport.errors import ServerError
from kernelport.types import DATATYPES, datatype


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known_datatype(value: str) -> str:
    """The V2 name of a datatype given as V2 ("FP32") or Triton config ("TYPE_FP32") name."""
    try:
        return datatype(value.upper()).name
    except ServerError:
        raise ValueError(
            f"unknown datatype '{value}', expected one of {', '.join(DATATYPES)}"
        ) from None
