"""A request's output constraint: OpenAI's ``response_format`` or vLLM's ``structured_outputs`` extra body ->
StructuredOutputsParams, with a 400 naming the field for anything malformed. Schemas are checked against
their JSON Schema meta-schema here (torch-free); what only the grammar compiler can judge (an EBNF grammar,
a regex's dialect) comes back from the engine as a 400 too."""

from __future__ import annotations

from typing import Any

import jsonschema

from pagoda.api.params import StructuredOutputsParams
from pagoda.server.errors import APIError
from pagoda.server.protocol import SamplingFields


def structured_outputs_of(req: SamplingFields) -> StructuredOutputsParams | None:
    response_format, extra = req.response_format, req.structured_outputs
    from_format = _from_response_format(response_format) if response_format is not None else None
    if from_format is not None and extra is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", "structured_outputs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise APIError(400, "structured_outputs must be an object", "structured_outputs")
        unknown = sorted(set(extra) - {"json", "regex", "choice", "grammar", "json_object"})
        if unknown:
            raise APIError(400, f"structured_outputs has unknown fields: {', '.join(unknown)}", "structured_outputs")
        if isinstance(extra.get("json"), dict):
            check_schema(extra["json"], "structured_outputs.json")
        return _params(extra, "structured_outputs")
    return from_format


def _from_response_format(value: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _params({"json_object": True}, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           "response_format.json_schema.schema")
        check_schema(spec["schema"], "response_format.json_schema.schema")
        return _params({"json": spec["schema"]}, "response_format")
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                   "response_format.type")


def check_schema(schema: dict[str, Any], param: str) -> None:
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise APIError(400, f"{param} is not a valid JSON schema at {where}: {exc.message}", param) from None


def _params(fields: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc), param) from None
