"""Resilience policies built from settings: frozen dataclasses whose fields mirror a config section."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

P = TypeVar("P", bound="DataclassInstance")


def from_section(policy: type[P], section: BaseModel, **overrides: Any) -> P:
    """A ``policy`` whose fields take the same-named values of ``section``, except those in ``overrides``."""
    values = {f.name: getattr(section, f.name) for f in fields(policy) if f.name not in overrides}
    return policy(**values, **overrides)
