"""Validation before any upstream call: JSON, types, model name, max_tokens, prompt length.

The gateway holds no tokenizer, so it bounds the prompt's token count from its text:

* token-id prompts are counted exactly;
* text is bounded from below by `ceil(utf8_bytes / MAX_BYTES_PER_TOKEN)`: no token of
  a byte-level BPE vocabulary (the built-ins', Granite's, Llama's) spans more than
  that many bytes in practice, so a prompt rejected here is too long for certain;
* text is bounded from above by its UTF-8 byte count plus the chat template's
  overhead (a byte-level tokenizer never needs more than one token per byte).

A chat's text is its messages', the calls its assistant messages made and its tools'
definitions as JSON (`ChatCompletionRequest.prompt_text_bytes`); the upper bound adds the
template's preamble that explains the tools and the markup around each call.

A request whose lower bound does not fit any candidate backend is a 400 here; one
that merely might not fit goes on, and the worker, which tokenizes exactly, has
the last word. `auto` and aliases prefer backends where even the upper bound fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridserve import protocol as P
from hybridserve.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from hybridserve.gateway.registry import BackendState, Registry
from hybridserve.gateway.routing import BYTES_PER_TOKEN_GUESS, split_model
from hybridserve.router.policies import POLICY_NAMES

MAX_BYTES_PER_TOKEN = 32
CHAT_OVERHEAD_TOKENS_PER_MESSAGE = 8
TOOLS_OVERHEAD_TOKENS = 512       # a chat template's preamble that explains the tools
TOOL_CALL_OVERHEAD_TOKENS = 24    # the markup around one call in an assistant message


@dataclass
class Admitted:
    """A request that passed validation, with the backends it may go to (best first)."""

    model: str
    stream: bool
    pinned: bool
    candidates: list[BackendState]
    preferred: frozenset[str] = frozenset()  # names where even the upper bound fits
    data: dict = field(default_factory=dict)  # the parsed body
    raw: bytes = b""
    chat: bool = False
    client_usage: bool = False    # the client asked for stream_options.include_usage
    max_tokens: int | None = None
    policy: str | None = None     # from `auto:<policy>`
    prompt_bytes: int = 0
    prompt_lower: int = 0
    prompt_upper: int = 0         # upper bound of the largest prompt
    prompts: int = 1              # prompts in a batch completion (each gets n completions)


def prompt_bytes(req: Any, chat: bool) -> int:
    """The prompt's size for the router's token estimate: a chat's text (tools and calls
    included), else the largest prompt's bytes."""
    if chat:
        return req.prompt_text_bytes()
    return max(len(p.encode()) if isinstance(p, str) else len(p) * BYTES_PER_TOKEN_GUESS
               for p in req.prompts())


def prompt_bounds(req: Any, chat: bool, chat_bytes: int | None = None) -> tuple[int, int]:
    """(lower, upper) bound on the prompt's token count (the largest prompt of a batch);
    `chat_bytes`: a chat's `prompt_text_bytes()` when the caller has it already."""
    if chat:
        nbytes = req.prompt_text_bytes() if chat_bytes is None else chat_bytes
        upper = nbytes + CHAT_OVERHEAD_TOKENS_PER_MESSAGE * (len(req.messages) + 1)
        if req.tools:
            upper += TOOLS_OVERHEAD_TOKENS
        upper += TOOL_CALL_OVERHEAD_TOKENS * sum(len(m.tool_calls or ()) for m in req.messages)
        return -(-nbytes // MAX_BYTES_PER_TOKEN), upper
    lower = upper = 0
    for p in req.prompts():
        if isinstance(p, str):
            nbytes = len(p.encode())
            lo, hi = -(-nbytes // MAX_BYTES_PER_TOKEN), nbytes + 2
        else:
            lo = hi = len(p)
        lower, upper = max(lower, lo), max(upper, hi)
    return lower, upper


def _check_fit(candidates: list[BackendState], lower: int, max_tokens: int | None) -> list[BackendState]:
    fits = [b for b in candidates
            if lower + (max_tokens or 1) <= b.config.max_context]
    if fits:
        return fits
    longest = max(b.config.max_context for b in candidates)
    if max_tokens is not None and max_tokens >= longest:
        raise InvalidRequestError(f"max_tokens ({max_tokens}) must be below the model's context "
                                  f"length ({longest})", param="max_tokens")
    raise ContextLengthExceededError(
        f"the prompt is at least {lower} tokens and cannot fit the context of any backend for "
        f"this model (longest: {longest} tokens, including max_tokens={max_tokens or 1})")


def admit(raw: bytes, chat: bool, registry: Registry) -> Admitted:
    """Validate a request body; raise a typed 400/404 naming the problem, else say where it may go."""
    data = P.parse_body(raw)
    req = P.validate_request(P.ChatCompletionRequest if chat else P.CompletionRequest, data)
    model, policy = split_model(req.model)
    if policy is not None and policy not in POLICY_NAMES:
        raise ModelNotFoundError(f"model '{req.model}': unknown routing policy '{policy}'; use "
                                 + ", ".join(f"auto:{p}" for p in POLICY_NAMES))
    candidates, pinned = registry.resolve(model)
    nbytes = prompt_bytes(req, chat)
    lower, upper = prompt_bounds(req, chat, nbytes if chat else None)
    max_tokens = req.requested_max_tokens()
    fits = _check_fit(candidates, lower, max_tokens)
    sure = frozenset(b.name for b in fits if upper + (max_tokens or 1) <= b.config.max_context)
    return Admitted(req.model, bool(req.stream), pinned, fits, sure, data, raw, chat,
                    req.include_usage(), max_tokens, policy, nbytes, lower, upper,
                    1 if chat else max(1, len(req.prompts())))
