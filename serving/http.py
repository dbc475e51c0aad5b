"""What the API says to people: the OpenAPI page, the OpenAPI document, client errors.

BentoML generates the OpenAPI document from the request and response models, serves its
stock Swagger page at ``/`` (with a tag-manager script and external badges) and answers a
request that fails validation with ``{"error": "1 validation error for
RecommendRequestIODescriptor", "detail": [...]}``, logging a traceback at ERROR. This module
puts the user-facing side right without touching BentoML:

- ``GET /docs`` (and ``/``, in place of BentoML's page): an offline Swagger page
  (BentoML's bundled assets, no external URL) titled and versioned as smlrec, reading
  ``/docs.json``;
- ``GET /docs.json``: BentoML's document with smlrec's title, version and description, a
  request example per endpoint, and the statuses the service answers (400, 404, 413, 503)
  documented with the error body it sends;
- a 4xx from validation gets an ``error`` that names the field and the reason in one
  sentence, and the field itself in ``field`` (``detail`` keeps pydantic's list);
- :class:`ClientErrorsAsWarnings` logs such a request as one WARNING line, not a traceback.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from serving.limits import ASGIApp, Message, Receive, Scope, Send
from serving.schemas import FORM_ERROR

DOCS_PATH = "/docs"
SPEC_PATH = "/docs.json"

DESCRIPTION = (
    "Recommendations from the model the daily smlrec run promoted (production), with a "
    "canary share of users served by the newest candidate. Users the model does not know "
    "are answered from their recent items (the request's, else the Feast online store's), "
    "else with the most popular items; the response's `path` says which. `/metadata` says "
    "which models are served, their gate scores and the last gate decision.\n\n"
    "Every refused request is answered with a 4xx and a JSON body whose `error` names the "
    "problem in one sentence (`field` names the offending field where there is one). "
    "`POST /feedback` records interactions durably (the next daily run's input) and moves "
    "the user's embedding within a second (path `fresh`).\n\n"
    "Health: `GET /livez`, readiness: `GET /readyz`, Prometheus metrics: `GET /metrics`.")

EXAMPLES: dict[str, dict[str, Any]] = {
    "/recommend": {"user_id": "196", "k": 10, "exclude_seen": True},
    "/score": {"user_id": "196", "item_ids": ["242", "302"]},
    "/similar_items": {"item_id": "242", "k": 10},
    "/feedback": {"events": [{"user_id": "196", "item_id": "242",
                              "timestamp": "2026-12-04T08:00:00Z"},
                             {"user_id": "196", "item_id": "302", "rating": 5}]},
    "/metadata": {},
    "/reload": {},
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, in one sentence."},
        "field": {"type": "string", "description": "The offending field (validation "
                  "errors only), e.g. `k` or `recent_items[3]`."},
        "detail": {"type": "array", "items": {"type": "object"},
                   "description": "Every validation error, as pydantic reports it."},
    },
}

STATUSES: dict[str, tuple[str, dict[str, Any]]] = {
    "400": ("The request is malformed: not JSON, a missing or unknown field, a wrong type or "
            "a value out of range.",
            {"error": "k: input should be greater than or equal to 1", "field": "k"}),
    "404": ("An id the model does not know (/score: item ids, or a user with no known recent "
            "items; /similar_items: the item).",
            {"error": "unknown item ids: 'i-999'", "unknown_item_ids": ["i-999"]}),
    "413": ("The request body is over the limit (SMLREC_MAX_BODY_BYTES, 1 MiB by default).",
            {"error": "request body of 2,400,000 bytes or more exceeds the limit of "
                      "1,048,576 bytes"}),
    "503": ("No model has been accepted yet (/score and /similar_items need one; /recommend "
            "answers with popular items instead); /feedback: the feedback log cannot be "
            "written (nothing was recorded: retry).",
            {"error": "no model has been accepted yet (the service answers /recommend with "
                      "popular items); see /metadata"}),
}
# Which statuses each endpoint answers (BentoML lists 400, 404 and 500 for every one).
ANSWERS = {"/recommend": ("400", "413"), "/score": ("400", "404", "413", "503"),
           "/similar_items": ("400", "404", "413", "503"), "/feedback": ("400", "413", "503"),
           "/metadata": ("400", "413"),
           "/reload": ("400", "413")}


def smlrec_version() -> str:
    try:
        return version("smlrec")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def docs_page(spec_url: str = SPEC_PATH) -> str:
    """The OpenAPI page: Swagger UI from BentoML's bundled assets, no external URL."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>smlrec prediction API {smlrec_version()}</title>
<link rel="stylesheet" type="text/css" href="/static_content/swagger-ui.css">
<link rel="icon" type="image/png" href="/static_content/favicon-light-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js" charset="utf-8"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{
    url: "{spec_url}", dom_id: "#swagger-ui", deepLinking: true,
    validatorUrl: null, tryItOutEnabled: true,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"
  }});
}};
</script>
</body>
</html>
"""


def openapi(spec: dict[str, Any]) -> dict[str, Any]:
    """BentoML's OpenAPI document as smlrec publishes it (a new dict)."""
    spec = json.loads(json.dumps(spec))
    spec["info"] = {"title": "smlrec prediction API", "version": smlrec_version(),
                    "description": DESCRIPTION}
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, ops in spec.get("paths", {}).items():
        post = ops.get("post")
        if path not in ANSWERS or not post:
            continue
        body = post.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            body["example"] = EXAMPLES[path]
        responses = {code: r for code, r in post.get("responses", {}).items()
                     if code.startswith("2")}
        for code in ANSWERS[path]:
            text, example = STATUSES[code]
            responses[code] = {"description": text, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}, "example": example}}}
        post["responses"] = responses
    return spec


def _field(loc: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def readable_error(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """(field, one sentence naming the field and the reason) for pydantic's error list."""
    if not errors:
        return "", "the request is not valid"
    first = errors[0]
    kind, msg = first.get("type", ""), str(first.get("msg", "invalid")).rstrip(".")
    field = _field(first.get("loc") or [])
    if kind == FORM_ERROR and not field:  # a rule over several fields, named first
        field, sentence = msg.split(" ", 1)[0], msg
    elif kind == "json_invalid":
        reason = msg.removeprefix("Invalid JSON: ")
        sentence = f"the body is not valid JSON ({reason})"
    elif not field:
        sentence = f"the body must be a JSON object ({msg[:1].lower() + msg[1:]})"
    elif kind == "missing":
        sentence = f"{field} is required"
    elif kind == "extra_forbidden":
        sentence = f"{field} is not a field of this request"
    else:
        sentence = f"{field}: {msg[:1].lower() + msg[1:]}"
    if len(errors) > 1:
        sentence += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return field, sentence


def _rewrite_error(body: bytes) -> bytes:
    """A BentoML 4xx body with a readable ``error`` (unchanged when it is not one)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, list) and len(payload) == 1 and isinstance(payload[0], dict):
        payload = payload[0]  # BentoML answers some 4xx as a one-element list
    if not isinstance(payload, dict):
        return json.dumps({"error": str(payload)}).encode()
    errors = payload.get("detail") if isinstance(payload.get("detail"), list) else []
    if str(payload.get("error", "")).endswith("IODescriptor") or (
            errors and "field" not in payload):
        field, sentence = readable_error(errors)
        detail = [{k: v for k, v in d.items() if k != "url"} if isinstance(d, dict) else d
                  for d in errors]
        if field and isinstance(detail[0], dict) and not detail[0].get("loc"):
            detail[0]["loc"] = [field]  # a rule over several fields: the one it names
        payload = {"error": sentence, **({"field": field} if field else {}), "detail": detail}
    return json.dumps(payload).encode()


class ApiFront:
    """ASGI middleware: serves ``/docs`` and the published ``/docs.json``, and rewrites
    validation errors (see the module docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        if method in ("GET", "HEAD") and path in ("/", DOCS_PATH, DOCS_PATH + "/"):
            await _send(send, 200, docs_page().encode(), b"text/html; charset=utf-8")
            return
        if method == "GET" and path == SPEC_PATH:
            status, body = await _collect(self.app, scope, receive)
            if status == 200:
                body = json.dumps(openapi(json.loads(body))).encode()
            await _send(send, status, body, b"application/json")
            return
        if method != "POST":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def relay(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] in (400, 422):
                    start = message  # held until the body is complete
                    return
                await send(message)
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = _rewrite_error(b"".join(chunks))
                    headers = [(k, v) for k, v in start.get("headers", [])
                               if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, relay)


async def _collect(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, bytes]:
    status, chunks = 500, []

    async def sink(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, sink)
    return status, b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ClientErrorsAsWarnings(logging.Filter):
    """Turns BentoML's "Exception on /route" ERROR record with a traceback, logged for a
    request that failed validation (a client error, answered 400), into one WARNING line
    naming the route and the problem. Other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "ValidationError" or not hasattr(exc, "errors"):
            return True
        try:
            _, sentence = readable_error(exc.errors(include_context=False, include_input=False))
        except Exception:  # noqa: BLE001 - a log line must never fail the request
            sentence = "invalid request"
        route = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg, record.args = "client error on %s: %s (answered 400)", (route, sentence)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True


def install_log_filter() -> None:
    """Attach :class:`ClientErrorsAsWarnings` to the logger BentoML reports them on."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorsAsWarnings) for f in logger.filters):
        logger.addFilter(ClientErrorsAsWarnings())
