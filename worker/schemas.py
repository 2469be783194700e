"""JSON Schemas (draft 2020-12) of the messages other languages publish, and of each workflow's params.

``envelope_schemas`` describes the start and event envelopes as the worker
parses them (``shared/messages.py``); ``workflow_schemas`` adds, for each
workflow, its params and output (from the function's annotations, through
pydantic) and the start envelope narrowed to that workflow. ``stepline
schema`` (``worker/schema_cli.py``) prints them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.errors import PydanticInvalidForJsonSchema

from stepline.shared.messages import SCHEMA_VERSION, EventMessage, StartMessage
from stepline.worker.workflow import Workflow

__all__ = ["DRAFT", "envelope_schemas", "schema_document", "workflow_schemas"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
Schema = dict[str, Any]


def _envelope(model: type[BaseModel], kind: str) -> Schema:
    schema = model.model_json_schema(mode="validation")
    # The worker reads "v" and "kind" before anything else and refuses a message without them
    # (parse_message), though the models give both defaults: a publisher must send them.
    schema["required"] = ["v", "kind", *schema.get("required", [])]
    return {
        "$schema": DRAFT,
        "$id": f"urn:stepline:v{SCHEMA_VERSION}:{kind}",
        **schema,
    }


def envelope_schemas() -> dict[str, Schema]:
    """The start and event envelopes (schema version 1), as the worker validates them."""
    return {"start": _envelope(StartMessage, "start"), "event": _envelope(EventMessage, "event")}


def _type_schema(adapter: TypeAdapter[Any], mode: str, what: str) -> Schema:
    try:
        schema = adapter.json_schema(mode="validation" if mode == "validation" else "serialization")
    except PydanticInvalidForJsonSchema as exc:
        # The type still works in Python; only its schema cannot be written down.
        return {"$schema": DRAFT, "$comment": f"{what} has no JSON Schema: {exc}"}
    return {"$schema": DRAFT, **schema}


def _narrowed_start(start: Schema, workflow: Workflow[Any, Any], params: Schema) -> Schema:
    """The start envelope for one workflow: its name as a constant, its params schema in place."""
    narrowed = copy.deepcopy(start)
    narrowed["$id"] = f"{start['$id']}:{workflow.name}"
    narrowed["title"] = f"StartMessage of {workflow.name}"
    properties = narrowed["properties"]
    properties["workflow"] = {"const": workflow.name, "title": "Workflow", "type": "string"}
    inner = {key: value for key, value in params.items() if key not in ("$schema", "$defs")}
    properties["params"] = {"title": "Params", **inner}
    defs = {**narrowed.get("$defs", {}), **params.get("$defs", {})}
    if defs:
        narrowed["$defs"] = defs
    # A typed workflow needs its params; one whose params may be null (None, Optional) does not.
    if "params" not in narrowed["required"] and not _accepts_null(workflow):
        narrowed["required"].append("params")
    return narrowed


def _accepts_null(workflow: Workflow[Any, Any]) -> bool:
    try:
        workflow.params_adapter.validate_python(None)
    except ValueError:
        return False
    return True


def workflow_schemas(workflows: Mapping[str, Workflow[Any, Any]]) -> dict[str, dict[str, Schema]]:
    """For each workflow, by name: ``params``, ``output`` and its narrowed ``start`` envelope."""
    start = envelope_schemas()["start"]
    found: dict[str, dict[str, Schema]] = {}
    for name in sorted(workflows):
        workflow = workflows[name]
        params = _type_schema(workflow.params_adapter, "validation", f"the params of {name!r}")
        output = _type_schema(workflow.output_adapter, "serialization", f"the output of {name!r}")
        found[name] = {"params": params, "output": output, "start": _narrowed_start(start, workflow, params)}
    return found


def schema_document(workflows: Mapping[str, Workflow[Any, Any]] | None = None) -> dict[str, Any]:
    """What ``stepline schema`` prints: the envelopes, and each given workflow's schemas."""
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **envelope_schemas()}
    if workflows is not None:
        document["workflows"] = workflow_schemas(workflows)
    return document
