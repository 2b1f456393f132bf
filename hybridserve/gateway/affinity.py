"""Prefix affinity: which backend holds a request's prefix in its cache, and about how much of it.

A backend that served a conversation keeps its prefix cached (native workers and vLLM
both), so its next turn is cheaper there. The gateway remembers, per tenant, the
backend that last answered each affinity key, and how many tokens of prompt + answer
it then held:

* `session`: the `X-Session-Id` header (an agent session);
* `prompt_cache_key`: OpenAI's request field for requests meant to share a cache;
* `prefix`: a fingerprint of the request's stable head — tools plus leading system
  messages for chat, the first 2 KiB of a completion prompt — for clients that send
  neither (many agents share one system prompt).

The router turns a remembered key into an expected cache hit on that backend (its
economics price the cheaper prefill), bounded by load. Keys are tenant-scoped, so one
tenant's traffic never tells another where its prefixes live. Memory is bounded: the
least recently used keys go first.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

HEAD_BYTES = 2048          # of a completion prompt, fingerprinted
BYTES_PER_TOKEN = 4        # a fingerprinted head's size in tokens, roughly, when nothing was measured


@dataclass(frozen=True)
class Hint:
    """`backend` answered this key last, holding about `tokens` of its prefix."""

    backend: str
    tokens: int
    via: str  # session | prompt_cache_key | prefix


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def head_of(data: dict, chat: bool) -> tuple[str, int] | None:
    """(fingerprint text, its size in bytes) of the request's stable head, or None if it has none."""
    if chat:
        msgs = data.get("messages") or []
        system = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer"):
                break
            system.append(m.get("content"))
        tools = data.get("tools")
        if not system and not tools:
            return None
        text = json.dumps([system, tools], sort_keys=True, ensure_ascii=False, default=str)
        return text, len(text.encode("utf-8", "surrogatepass"))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and len(prompt) >= 256:
        head = prompt[:HEAD_BYTES]
        return head, len(head.encode("utf-8", "surrogatepass"))
    if isinstance(prompt, list) and len(prompt) >= 64 and all(isinstance(t, int) for t in prompt[:512]):
        head = prompt[:512]
        return json.dumps(head), len(head) * BYTES_PER_TOKEN
    return None


class PrefixAffinity:
    def __init__(self, capacity: int = 50_000):
        self.capacity = capacity
        self._keys: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()  # (via, digest) -> (backend, tokens)
        self._lock = threading.Lock()

    def keys(self, tenant: str, data: dict, headers: Any, chat: bool) -> list[tuple[str, str, int]]:
        """The request's affinity keys, most specific first: (via, digest, tokens known without history)."""
        out = []
        sid = headers.get("x-session-id") if headers is not None else None
        if sid:
            out.append(("session", _digest(tenant, "s", sid[:128]), 0))
        pck = data.get("prompt_cache_key")
        if isinstance(pck, str) and pck:
            out.append(("prompt_cache_key", _digest(tenant, "k", pck[:256]), 0))
        head = head_of(data, chat)
        if head is not None:
            out.append(("prefix", _digest(tenant, "p", head[0]), head[1] // BYTES_PER_TOKEN))
        return out

    def hints(self, keys: list[tuple[str, str, int]], prompt_tokens: int) -> dict[str, Hint]:
        """Per backend, the most specific key it answered last; tokens bounded by this prompt."""
        found: dict[str, Hint] = {}
        with self._lock:
            for via, digest, _ in keys:
                got = self._keys.get((via, digest))
                if got is None:
                    continue
                self._keys.move_to_end((via, digest))
                backend, tokens = got
                if backend not in found:
                    found[backend] = Hint(backend, max(0, min(tokens, prompt_tokens - 1)), via)
        return found

    def record(self, keys: list[tuple[str, str, int]], backend: str, prompt_tokens: int,
               completion_tokens: int) -> None:
        """`backend` answered: it now holds this prompt and its answer (the head, for a prefix key)."""
        with self._lock:
            for via, digest, head_tokens in keys:
                held = prompt_tokens + completion_tokens if via != "prefix" else min(head_tokens, prompt_tokens)
                self._keys[(via, digest)] = (backend, held)
                self._keys.move_to_end((via, digest))
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def __len__(self) -> int:
        return len(self._keys)
