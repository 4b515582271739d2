"""``messaging.yaml``: which message events this gateway receives, and the write each is.

    event_system: https://careconnect-gateway.github.io/fhir/CodeSystem/message-event
    events:
      patient-registration: {display: ..., focus: Patient, write: create}
      patient-demographics-update: {display: ..., focus: Patient, write: update}

An event names the type of its focus resource (served by the directory's mappings, with
that write declared) and the write: the focus is sent through the type's provider, as a
REST create or update would be (ADT^A28 / ADT^A31 on an HL7 v2 PAS). Checked when the
gateway starts; a problem is ``file:line: key: message``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.mapping.loader import MappingError, Problem, _validation_problems
from gateway.mapping.yamlfile import YamlError, line_of, load
from gateway.registry import Registry

FILE = "messaging.yaml"
DEFAULT_SYSTEM = "https://careconnect-gateway.github.io/fhir/CodeSystem/message-event"
_CODE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Event(_Strict):
    display: str
    focus: str
    write: Literal["create", "update"]
    documentation: str | None = None


class MessagingFile(_Strict):
    event_system: str = DEFAULT_SYSTEM
    events: dict[str, Event] = Field(default_factory=dict)


def load_messaging(directory: Path, registry: Registry) -> MessagingFile | None:
    """The directory's messaging declaration, checked; None when it declares none."""
    path = directory / FILE
    if not path.is_file():
        return None
    try:
        doc: Any = load(path)
    except YamlError as exc:
        raise MappingError([Problem(path, exc.line, exc.message)]) from None
    if not isinstance(doc, dict):
        raise MappingError([Problem(path, 1, "expected a mapping of keys")])
    try:
        spec = MessagingFile.model_validate(doc)
    except ValidationError as exc:
        raise MappingError(_validation_problems(path, doc, exc)) from None
    problems = []
    for code, event in spec.events.items():
        at = ["events", code]
        if not _CODE.match(code):
            problems.append(Problem(path, line_of(doc, at),
                                    f"events.{code}: an event code is lower case letters, "
                                    "digits and '-'"))
        if event.focus not in registry:
            problems.append(Problem(path, line_of(doc, [*at, "focus"]),
                                    f"events.{code}.focus: {event.focus} is not served here"))
        elif event.write not in registry.get(event.focus).interactions:
            problems.append(Problem(path, line_of(doc, [*at, "write"]),
                                    f"events.{code}.write: {event.focus} declares no "
                                    f"{event.write} (its mapping's write:)"))
    if problems:
        raise MappingError(problems)
    return spec
