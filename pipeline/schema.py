"""JSON Schema of a manifest, with each stage type's config, for editor completion."""
from __future__ import annotations

from typing import Any

from pipeline.manifest import Manifest
from pipeline.registry import get_stage_class, stage_types


def manifest_json_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    variants = []
    for type_key in stage_types():
        cls = get_stage_class(type_key)
        variants.append({
            "type": "object",
            "title": type_key,
            "description": (cls.__doc__ or "").strip().split("\n")[0],
            "properties": {
                "name": {"type": "string"},
                "type": {"const": type_key},
                "inputs": {"type": ["object", "array", "string"],
                           "description": "roles: " + ", ".join(cls.inputs) if cls.inputs else "none"},
                "config": cls.Config.model_json_schema(),
            },
            "required": ["name", "type"],
            "additionalProperties": False,
        })
    schema["properties"]["stages"] = {"type": "array", "minItems": 1, "items": {"oneOf": variants}}
    return schema
