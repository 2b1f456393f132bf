"""One eval request: body for (target, item), the HTTP call, and what its answer measured.

Body: `model`, `messages` or `prompt`, `max_tokens`, `temperature` 0 (unless the item
or the target sets one), `logprobs` (true for chat, 1 for completions), then the item's
`params`, then the target's params (the target wins). A target param
`hybridserve_task=@tag` becomes each item's first tag, so the gateway routes it by task
kind. `call` never raises: transport
errors and non-2xx answers come back as an `Answer` with `status` and `error` set.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from hybridserve.eval.dataset import Item
from hybridserve.eval.targets import Target

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 32
ITEM_TAG = "@tag"   # `+hybridserve_task=@tag`: send each item's first tag as the request's task kind


@dataclass
class Answer:
    text: str | None = None
    status: int | None = None
    error: str | None = None
    mean_logprob: float | None = None
    cost_usd: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    backend: str | None = None
    tiers: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_body(target: Target, item: Item) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "max_tokens": item.max_tokens or DEFAULT_MAX_TOKENS,
                            "temperature": 0.0 if item.temperature is None else item.temperature}
    if item.chat:
        body.update(messages=item.messages, logprobs=True)
    else:
        body.update(prompt=item.prompt, logprobs=1)
    body = {**body, **item.params, **target.params}
    if body.get("hybridserve_task") == ITEM_TAG:  # the target asked to tag each request with its task kind
        body["hybridserve_task"] = item.tags[0] if item.tags else "all"
    return body


def mean_logprob(choice: dict, chat: bool) -> float | None:
    lp = choice.get("logprobs") or {}
    if not isinstance(lp, dict):
        return None
    if chat:
        vals = [e.get("logprob") for e in lp.get("content") or [] if isinstance(e, dict)]
    else:
        vals = list(lp.get("token_logprobs") or [])
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(vals) / len(vals) if vals else None


def _text(choice: dict, chat: bool) -> str:
    if chat:
        return str((choice.get("message") or {}).get("content") or "")
    return str(choice.get("text") or "")


def parse_answer(data: dict, headers: httpx.Headers, chat: bool) -> Answer:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Answer(status=200, error="response has no choices")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    cost = usage.get("cost_usd")
    return Answer(text=_text(choices[0], chat), status=200, mean_logprob=mean_logprob(choices[0], chat),
                  cost_usd=float(cost) if isinstance(cost, (int, float)) else 0.0,
                  prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
                  backend=headers.get("x-hybridserve-backend") or usage.get("route_backend"),
                  tiers=usage.get("tiers"))


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or r.text)[:500]
    except ValueError:
        return r.text[:500]


async def post(client: httpx.AsyncClient, url: str, body: dict, chat: bool) -> Answer:
    """POST body to {url}/chat/completions or /completions; an Answer whatever happens."""
    path = "/chat/completions" if chat else "/completions"
    t0 = time.perf_counter()
    try:
        r = await client.post(url.rstrip("/") + path, json=body)
    except httpx.HTTPError as err:
        return Answer(error=f"{type(err).__name__}: {err}"[:500], latency_s=time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if r.status_code >= 400:
        return Answer(status=r.status_code, error=_error_text(r), latency_s=latency,
                      backend=r.headers.get("x-hybridserve-backend"))
    try:
        data = r.json()
        ans = parse_answer(data if isinstance(data, dict) else {}, r.headers, chat)
    except (ValueError, TypeError, AttributeError):
        ans = Answer(status=r.status_code, error="response is not an OpenAI completion")
    ans.status, ans.latency_s = r.status_code, latency
    return ans


async def call(client: httpx.AsyncClient, url: str, target: Target, item: Item) -> Answer:
    return await post(client, url, request_body(target, item), item.chat)
