"""The OpenAPI document. Routes that parse their own JSON body (so that middleware sees it
first) describe it here: ``body(Model)`` in a route's ``openapi_extra``, the model's schema
added to the document's components."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_BODY_MODELS: list[type[BaseModel]] = []


def ref(model: type[BaseModel]) -> dict:
    if model not in _BODY_MODELS:
        _BODY_MODELS.append(model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def body(model: type[BaseModel]) -> dict:
    """Describe a JSON request body that the route parses itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(model)}}}}


def document(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in _BODY_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components[model.__name__] = schema
    app.openapi_schema = doc
    return doc
