"""The OpenAPI 3.1 description of the server's endpoints, served at ``/openapi.json``.

Written by hand (the handlers validate bodies themselves, see protocol.py, so FastAPI has no
models to generate it from); the bounds in it are the ones limits.py and body.py enforce.
tests/test_server_fuzz.py generates requests from it.
"""
from __future__ import annotations

import copy

from .body import MAX_JSON_DEPTH, MAX_JSON_VALUES
from .limits import MAX_N, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, MAX_TOKEN_ID, MAX_TOOLS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_URL = {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}
_OPTIONS = {k: {"type": "number", "minimum": 0} for k in ("min_pixels", "max_pixels", "total_pixels", "fps",
                                                         "num_frames")}
_PART = {"oneOf": [
    {"type": "object", "required": ["type", "text"],
     "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
    {"type": "object", "required": ["type", "image_url"],
     "properties": {"type": {"const": "image_url"}, "image_url": {"oneOf": [_URL, {"type": "string"}]}}},
    {"type": "object", "required": ["type", "video_url"],
     "properties": {"type": {"const": "video_url"}, "video_url": {"oneOf": [_URL, {"type": "string"}]}}},
    {"type": "object", "required": ["type", "image"], "properties": {"type": {"const": "image"},
                                                                      "image": {"type": "string"}, **_OPTIONS}},
    {"type": "object", "required": ["type", "video"], "properties": {
        "type": {"const": "video"}, "video": {"oneOf": [{"type": "string"},
                                                        {"type": "array", "items": {"type": "string"}}]},
        **_OPTIONS}},
]}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ref("ContentPart")}, {"type": "null"}]},
    "name": {"type": "string"}, "tool_call_id": {"type": "string"},
    "tool_calls": {"type": "array", "maxItems": MAX_TOOLS, "items": {"type": "object"}}}}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1}, "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0}, "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1}, "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1},
    "min_tokens": {"type": "integer", "minimum": 0},
    "stop_token_ids": {"type": "array", "maxItems": MAX_STOP_TOKEN_IDS,
                       "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}},
    "stop": {"oneOf": [{"type": "string", "maxLength": MAX_STOP_CHARS},
                       {"type": "array", "maxItems": MAX_STOP,
                        "items": {"type": "string", "maxLength": MAX_STOP_CHARS}},
                       {"type": "null"}]},
    "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_LIMITS = (f"Bodies must be `application/json` (415 otherwise), within `--max-body-mb` (413), hold at most "
           f"{MAX_JSON_VALUES} JSON values nested at most {MAX_JSON_DEPTH} deep, valid UTF-8 without lone "
           "surrogates, no NaN / Infinity (400). The Host header must be an allowed host (421).")


def _post(summary: str, schema: str) -> dict:
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
              for code, text in ((400, "invalid request"), (401, "missing or wrong API key"),
                                 (404, "unknown model"), (413, "body too large"), (415, "not JSON"),
                                 (421, "Host not allowed"), (503, "busy: retry shortly"))}
    return {"post": {"summary": summary, "description": _LIMITS,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schema)}}},
                     "responses": {"200": {"description": "the completion (JSON, or server-sent events with "
                                                          "`stream`)"}, **errors}}}


def _get(summary: str, content_type: str = "application/json") -> dict:
    return {"get": {"summary": summary, "responses": {"200": {"description": summary,
                                                              "content": {content_type: {}}}}}}


_DOCUMENT = {
    "openapi": "3.1.0",
    "paths": {
        "/v1/chat/completions": _post("Chat completion (OpenAI-compatible)", "ChatCompletionRequest"),
        "/v1/completions": _post("Text completion of a raw prompt (OpenAI-compatible)", "CompletionRequest"),
        "/v1/models": _get("The served model"),
        "/health": _get("Liveness and engine load"),
        "/openapi.json": _get("This document"),
        "/": _get("The web chat page", "text/html"),
    },
    "components": {
        "schemas": {
            "ContentPart": _PART,
            "Message": _MESSAGE,
            "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
                **_COMMON, "messages": {"type": "array", "minItems": 1, "items": _ref("Message")},
                "tools": {"type": "array", "maxItems": MAX_TOOLS, "items": {"type": "object"}},
                "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
                "parallel_tool_calls": {"type": "boolean"},
                "response_format": {"type": "object", "properties": {
                    "type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": {"type": "object"}}},
                "mm_processor_kwargs": {"type": "object", "properties": _OPTIONS, "additionalProperties": False},
                "chat_template_kwargs": {"type": "object", "properties": {
                    "enable_thinking": {"type": "boolean"}, "add_vision_id": {"type": "boolean"}}}}},
            "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
                **_COMMON, "prompt": {"oneOf": [{"type": "string", "minLength": 1}, {
                    "type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                    "items": {"type": "string", "minLength": 1}}]}}},
            "Error": _ERROR,
        },
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}


def openapi_document(model_name: str) -> dict:
    doc = copy.deepcopy(_DOCUMENT)
    doc["info"] = {"title": "qwen3vl serve", "version": "1",
                   "description": f"OpenAI-compatible API serving '{model_name}'. {_LIMITS}"}
    return doc
