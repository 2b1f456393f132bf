"""models.yaml schema: validated config objects for backends, engines and the gateway.

`load_config(path)` reads the YAML file and returns a `HybridserveConfig`; any
mistake raises `ConfigError` whose message names the field (as a path such as
`backends[1].dtype`) and how to fix it. Nothing here touches the network: a
checkpoint that is a hub id is only checked for its shape, never looked up.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Arch = Literal["transformer", "hybrid"]
EngineKind = Literal["native", "vllm", "remote"]
DType = Literal["float32", "bfloat16", "float16"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PARSER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")   # vLLM's tool-call parser names: hermes, llama3_json, ...


class ConfigError(ValueError):
    """models.yaml is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NativeOptions(_Strict):
    """Knobs of the native engine (continuous batching, paged KV, state slots)."""

    max_num_seqs: int = Field(16, ge=1, le=4096, description="most sequences in one batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one engine step")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    cache_memory_gb: float = Field(1.0, gt=0, description="memory for KV blocks + state slots")
    enable_prefix_caching: bool = Field(True, description="reuse cached KV blocks and Mamba state "
                                                          "snapshots of earlier prompts")
    mamba_snapshot_interval: int | None = Field(
        None, ge=1, description="tokens between a hybrid's periodic state snapshots (a multiple of "
                                "block_size); default: the model's Mamba chunk size")
    max_num_waiting: int = Field(256, ge=1, description="waiting requests beyond which a new one gets "
                                 "429 with Retry-After")
    snapshot_memory_share: float = Field(0.25, ge=0, lt=1, description="share of cache_memory_gb left "
                                         "after the running sequences' states, kept for Mamba snapshots")

    @model_validator(mode="after")
    def _interval_in_blocks(self) -> "NativeOptions":
        i = self.mamba_snapshot_interval
        if i is not None and i % self.block_size:
            raise ValueError(f"native.mamba_snapshot_interval ({i}) must be a multiple of native.block_size "
                             f"({self.block_size})")
        return self


class VllmOptions(_Strict):
    """How hybridserve launches vLLM's OpenAI server for an `engine: vllm` backend.

    Served model name, port, dtype and max model length come from the backend itself;
    these are vLLM's own knobs (see hybridserve/worker/vllm_launcher.py).
    """

    python: str = Field(".venv-vllm/bin/python",
                        description="interpreter of vLLM's own venv (`make vllm-cpu` creates it); "
                                    "relative: from the working directory, then the checkout")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1,
                                          description="share of device memory (CPU memory on CPU)")
    kv_cache_space_gb: float | None = Field(
        None, gt=0, description="KV cache size (--kv-cache-memory-bytes); overrides the fraction")
    mamba_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = Field(
        None, description="--mamba-cache-dtype for hybrids (SSM state precision)")
    enable_prefix_caching: bool | None = Field(
        None, description="None: vLLM's default, except off for hybrids on CPU (required there)")
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    enforce_eager: bool = Field(False, description="skip torch.compile / CUDA graphs (faster start)")
    shim: bool = Field(True, description="hybridserve's middleware in vLLM: serve any `model` the "
                                         "gateway routed here, errors in the native worker's shape")
    startup_timeout_s: float = Field(600.0, gt=0, description="wait this long for vLLM's /health")
    tool_call_parser: str | None = Field(
        None, description="vLLM's parser of the model's tool-call text (e.g. 'hermes'), passed with "
                          "--enable-auto-tool-choice; vLLM 0.32 refuses every `tools` request with a "
                          "tool_choice other than 'none' without one (named and 'required' included)")
    structured_outputs_backend: Literal["auto", "xgrammar", "guidance", "outlines"] | None = Field(
        None, description="vLLM's guided-decoding library for response_format and named tool calls "
                          "(--structured-outputs-config.backend); None: vLLM's default (auto)")
    structured_outputs_compact: bool = Field(
        False, description="guided JSON without free whitespace between tokens "
                           "(--structured-outputs-config.disable_any_whitespace; xgrammar or guidance "
                           "only): a weak model otherwise fills max_tokens with spaces")
    chat_template: str | None = Field(
        None, description="a Jinja chat template file for vLLM (--chat-template), e.g. one that "
                          "renders `tools`; None: the checkpoint's own")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for vLLM")
    extra_args: list[str] = Field(default_factory=list, description="appended to vLLM's command line")

    @model_validator(mode="after")
    def _compact_needs_a_backend(self) -> "VllmOptions":
        if self.structured_outputs_compact and self.structured_outputs_backend not in ("xgrammar", "guidance"):
            raise ValueError("vllm.structured_outputs_compact needs vllm.structured_outputs_backend: xgrammar "
                             f"or guidance (vLLM refuses it with {self.structured_outputs_backend or 'auto'})")
        return self

    @field_validator("tool_call_parser")
    @classmethod
    def _parser_ok(cls, v: str | None) -> str | None:
        if v is not None and not _PARSER_RE.match(v):
            raise ValueError(f"'{v}' is not a tool-call parser name: use one of vLLM's "
                             "(`--tool-call-parser` in its --help, e.g. 'hermes', 'llama3_json')")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_ok(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("vllm.chat_template is empty: give the path of a Jinja template file, "
                             "or leave it out for the checkpoint's own")
        return v


class BackendConfig(_Strict):
    """One model served behind the gateway."""

    name: str
    arch: Arch
    engine: EngineKind = "native"
    checkpoint: str | None = None
    url: str | None = None
    dtype: DType = "float32"
    device: str = "cpu"
    max_context: int = Field(4096, ge=16)
    tier: str = "standard"
    price_per_hour: float = Field(ge=0)
    port: int | None = Field(None, ge=1, le=65535)
    host: str | None = Field(None, description="where the gateway reaches this worker when it runs on "
                             "another machine (a node's address, a Kubernetes Service name); `up` "
                             "starts only the workers without one. None: this machine")
    cpu_cores: str = Field("auto", description="cores `up` pins this worker to: 'auto' (an equal "
                                               "share per CPU backend), 'all' (no pinning) or a "
                                               "list like '0-3,8'; see hybridserve/cpu_binding.py")
    native: NativeOptions = Field(default_factory=NativeOptions)
    vllm: VllmOptions = Field(default_factory=VllmOptions)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v.startswith("auto"):
            raise ValueError(f"'{v}' is not a valid backend name: use letters, digits, '.', '_' "
                             "or '-', and do not start with 'auto' (reserved for routing aliases)")
        return v

    @field_validator("cpu_cores")
    @classmethod
    def _cores_ok(cls, v: str) -> str:
        v = v.strip()
        if v in ("auto", "all"):
            return v
        from hybridserve.cpu_binding import format_cores, parse_cores

        return format_cores(parse_cores(v))

    @field_validator("host")
    @classmethod
    def _host_ok(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])$", v):
            raise ValueError(f"'{v}' is not a host name or address: give it without scheme or port "
                             "(the port is `port`), e.g. 'hybridserve-small-hybrid' or '10.0.0.7'")
        return v

    @property
    def started_here(self) -> bool:
        """Whether `hybridserve up` starts this backend's worker on this machine."""
        return self.engine != "remote" and self.host is None

    @field_validator("device")
    @classmethod
    def _device_ok(cls, v: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?)$", v):
            raise ValueError(f"'{v}' is not a device: use 'cpu', 'cuda' or 'cuda:N'")
        return v

    @model_validator(mode="after")
    def _engine_fields(self) -> "BackendConfig":
        if self.engine == "remote":
            if self.host is not None:
                raise ValueError("`host` is for workers hybridserve runs elsewhere; a remote backend "
                                 "is reached at its `url` (remove `host`)")
            if self.cpu_cores not in ("auto", "all"):
                raise ValueError("`cpu_cores` pins workers hybridserve starts; a remote backend "
                                 "runs elsewhere (remove `cpu_cores`)")
            if not self.url or not re.match(r"^https?://", self.url):
                raise ValueError("engine 'remote' needs `url: http://host:port` of a running "
                                 "OpenAI-compatible server")
            return self
        if self.url:
            raise ValueError(f"`url` is only for engine 'remote'; engine '{self.engine}' is started "
                             "by hybridserve (remove `url`, or set `engine: remote`)")
        if not self.checkpoint:
            raise ValueError(f"engine '{self.engine}' needs `checkpoint`: 'builtin:NAME', a local "
                             "HF directory, a .gguf file, or (vllm only) a hub id like 'org/model'")
        check_checkpoint(self.checkpoint, self.engine)
        return self


def check_checkpoint(ref: str, engine: str) -> None:
    """Validate the form of a checkpoint reference without touching disk or network much."""
    if ref.startswith("builtin:"):
        from hybridserve.models.builtin import check_builtin

        check_builtin(ref.split(":", 1)[1])
        return
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        return
    if path.is_file() or path.suffix.lower() == ".gguf":
        from hybridserve.models.gguf import check_gguf

        check_gguf(path, engine)  # exists, is GGUF, and (native) an architecture it serves
        return
    if engine == "vllm" and _HUB_ID_RE.match(ref) and not ref.startswith(("/", ".", "~")):
        return  # a hub id; vLLM downloads it on nodes that can reach the hub
    raise ValueError(f"checkpoint '{ref}' is not 'builtin:NAME', a .gguf file or an existing directory"
                     + (" (or a hub id such as 'org/model')" if engine == "vllm" else
                        "; the native engine needs a local HF directory with config.json or a .gguf file"))


class BudgetConfig(_Strict):
    """A spending cap per API key and period, kept in the gateway's ledger (SQLite)."""

    name: str = Field("default", min_length=1)
    key: str = Field("*", description="sha256 hex of one API key, or '*' for every key (each its own)")
    usd: float | None = Field(None, gt=0)
    tokens: int | None = Field(None, ge=1)
    period: Literal["minute", "hour", "day", "week", "month"] = "day"

    @model_validator(mode="after")
    def _has_cap(self) -> "BudgetConfig":
        if self.usd is None and self.tokens is None:
            raise ValueError(f"budget '{self.name}' caps nothing: set `usd`, `tokens` or both")
        if self.key != "*" and not re.match(r"^[0-9a-f]{64}$", self.key):
            raise ValueError("budget `key` must be '*' or a sha256 hex digest (`hybridserve hash-key KEY`)")
        return self


class RateLimitConfig(_Strict):
    """Requests and worst-case tokens per minute for one API key, or each key ('*')."""

    name: str = Field("default", min_length=1)
    key: str = Field("*", description="sha256 hex of one API key, or '*' for every key (each its own)")
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens per minute: prompt upper bound + max_tokens "
                                                    "of every completion asked for")

    @model_validator(mode="after")
    def _has_limit(self) -> "RateLimitConfig":
        if self.rpm is None and self.tpm is None:
            raise ValueError(f"rate limit '{self.name}' limits nothing: set `rpm`, `tpm` or both")
        if self.key != "*" and not re.match(r"^[0-9a-f]{64}$", self.key):
            raise ValueError("rate limit `key` must be '*' or a sha256 hex digest (`hybridserve hash-key KEY`)")
        return self


RUNG_RESERVED = ("model", "prompt", "messages", "stream", "stream_options")


class CascadeRung(_Strict):
    """One step of `gateway.cascade`: a backend, or a backend with test-time-compute settings."""

    name: str = Field(description="the rung's label (as in the quality profile's targets)")
    backend: str
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="merged into the upstream body, e.g. "
                                               "{n: 5, hybridserve_vote: true, temperature: 0.7}")

    @field_validator("name")
    @classmethod
    def _rung_name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"'{v}' is not a valid rung name: use letters, digits, '.', '_' or '-'")
        return v

    @field_validator("params")
    @classmethod
    def _params_ok(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if k in RUNG_RESERVED]
        if bad:
            raise ValueError(f"params may not set {', '.join(bad)}: the request decides those "
                             "(use params for sampling and test-time compute: n, hybridserve_vote, "
                             "temperature, max_thinking_tokens, reasoning_effort)")
        if v.get("hybridserve_vote") and not (isinstance(v.get("n"), int) and v["n"] >= 2):
            raise ValueError("`hybridserve_vote: true` needs `n` >= 2 samples in the same params")
        return v


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auth: Literal["required", "disabled"] = "required"
    api_key_hashes: list[str] = Field(default_factory=list, description="sha256 hex of each key")
    api_keys_env: str = "HYBRIDSERVE_API_KEYS"
    request_timeout_s: float = Field(600.0, gt=0)
    # routing (hybridserve/gateway/routing.py)
    policy: str | None = Field(None, description="routing policy; None: economics (seeded from "
                               "economics_profile, else from config arithmetic)")
    economics_profile: str | None = Field(None, description="profile from `hybridserve bench`")
    quality_profile: str | None = Field(None, description="quality_profile.json from `hybridserve "
                                        "eval`: measured accuracy per backend and task tag")
    quality_floor: float | None = Field(None, ge=0, le=1, description="least measured accuracy a "
                                        "backend needs for `auto` (economics-family policies)")
    quality_floors: dict[str, float] = Field(default_factory=dict, description="alias or tier name "
                                             "-> its own quality floor (wins over quality_floor)")
    quality_unmeasured: Literal["allow", "deny"] = Field(
        "deny", description="whether a backend the profile does not measure meets a floor")
    default_tier: str | None = Field(None, description="the tier plain `auto` routes within "
                                     "(None: every backend)")
    cascade: list[CascadeRung] = Field(default_factory=list, description="rungs `auto:cascade` "
                                       "runs in order (instead of the tiers)")
    slo_ttft_s: float | None = Field(None, gt=0)
    slo_e2e_s: float | None = Field(None, gt=0)
    cascade_threshold: float = Field(-1.0, description="escalate below this mean token logprob "
                                     "(cascade) or log P(yes) of the verifier (parallel_verify)")
    verifier: str | None = Field(None, description="backend that judges drafts (parallel_verify)")
    step_tiers: dict[str, str] = Field(default_factory=dict,
                                       description="X-Step-Kind -> tier or backend name")
    prefix_affinity: bool = Field(True, description="price the expected prefix-cache hit on the backend "
                                  "that served the same session, prompt_cache_key or prefix")
    prefix_affinity_max_extra_load: float = Field(
        4.0, ge=0, description="a backend holding the prefix keeps its expected hit only while its load "
                               "(running + waiting) is at most this much above the least-loaded candidate's")
    # budgets (hybridserve/gateway/ledger.py, governor.py)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    rate_limits: list[RateLimitConfig] = Field(default_factory=list, description="per-key requests and "
                                               "tokens per minute (shared through state_url when set)")
    ledger_path: str = "hybridserve-ledger.sqlite"
    state_url: str | None = Field(None, description="redis://HOST:PORT/DB: budgets and sessions shared "
                                  "by every gateway replica naming it (instead of SQLite and memory)")
    state_prefix: str = Field("hybridserve", min_length=1, description="namespace of the Redis keys")
    state_timeout_s: float = Field(0.5, gt=0, description="longest wait for Redis at admission; "
                                   "past it the request gets a 503 (budgets fail closed)")
    # Batch API (hybridserve/gateway/batches.py, files.py)
    files_dir: str | None = Field(None, description="where uploaded and batch output files are kept "
                                  "(None: a `hybridserve-files` folder next to ledger_path); batch state "
                                  "is in hybridserve-batches.sqlite beside the ledger")
    batch_concurrency: int = Field(4, ge=1, le=1024, description="batch lines in flight at once, over "
                                   "every batch this gateway runs")
    session_max_tokens: int | None = Field(None, ge=1)
    session_max_usd: float | None = Field(None, gt=0)
    thinking_budgets: dict[str, int] = Field(
        default_factory=lambda: {"low": 256, "medium": 1024, "high": 4096},
        description="reasoning_effort -> max thinking tokens")

    @field_validator("policy")
    @classmethod
    def _policy_ok(cls, v: str | None) -> str | None:
        from hybridserve.router.policies import POLICY_NAMES

        if v is not None and v not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy '{v}': use one of {', '.join(POLICY_NAMES)}")
        return v

    def routing_policy(self) -> str:
        """`policy`, else economics (never a silent least-loaded fallback)."""
        return self.policy or "economics"

    @field_validator("quality_floors")
    @classmethod
    def _floors_ok(cls, v: dict[str, float]) -> dict[str, float]:
        for name, floor in v.items():
            if isinstance(floor, bool) or not 0 <= floor <= 1:
                raise ValueError(f"quality_floors.{name} must be a number in 0..1 (got {floor!r})")
        return v

    @model_validator(mode="after")
    def _quality_ok(self) -> "GatewayConfig":
        if (self.quality_floor is not None or self.quality_floors) and not self.quality_profile:
            raise ValueError("a quality floor (quality_floor / quality_floors) needs measurements: "
                             "set gateway.quality_profile (from `hybridserve eval`) or remove the floor")
        names = [r.name for r in self.cascade]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"gateway.cascade rung names must be unique; repeated: {', '.join(dupes)}")
        if len(self.cascade) == 1:
            raise ValueError("gateway.cascade needs two or more rungs to escalate between "
                             "(or remove it to cascade over the tiers)")
        return self

    @field_validator("state_url")
    @classmethod
    def _state_url_ok(cls, v: str | None) -> str | None:
        if v is not None and v.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ValueError(f"`state_url` must be a Redis URL (redis://HOST:6379/0, rediss://…, "
                             f"unix:///path/redis.sock), not '{v}'")
        return v

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes_ok(cls, v: list[str]) -> list[str]:
        for h in v:
            if not re.match(r"^[0-9a-f]{64}$", h):
                raise ValueError("each entry must be a sha256 hex digest (64 lowercase hex chars); "
                                 "make one with `hybridserve hash-key KEY`")
        return v


class HybridserveConfig(_Strict):
    backends: list[BackendConfig] = Field(min_length=1)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    aliases: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> "HybridserveConfig":
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(dupes)}")
        if self.gateway.verifier is not None and self.gateway.verifier not in names:
            raise ValueError(f"gateway.verifier '{self.gateway.verifier}' is not a backend; "
                             f"use one of: {', '.join(names)}")
        if self.gateway.policy == "parallel_verify" and self.gateway.verifier is None:
            raise ValueError("gateway.policy 'parallel_verify' needs gateway.verifier (a backend name)")
        self._routing_names_ok(names)
        targets = set(names) | {b.tier for b in self.backends}
        for kind, target in self.gateway.step_tiers.items():
            if target not in targets:
                raise ValueError(f"gateway.step_tiers.{kind}: '{target}' is neither a backend nor a "
                                 f"tier; use one of: {', '.join(sorted(targets))}")
        for alias, targets in self.aliases.items():
            if alias in names:
                raise ValueError(f"alias '{alias}' shadows a backend of the same name; rename one")
            missing = [t for t in targets if t not in names]
            if missing:
                raise ValueError(f"alias '{alias}' names unknown backends {missing}; "
                                 f"known: {', '.join(names)}")
        return self

    def _routing_names_ok(self, names: list[str]) -> None:
        """Cascade rungs name backends; quality floors name aliases or tiers; default_tier a tier."""
        gw, tiers = self.gateway, sorted({b.tier for b in self.backends})
        for i, rung in enumerate(gw.cascade):
            if rung.backend not in names:
                raise ValueError(f"gateway.cascade[{i}].backend '{rung.backend}' is not a backend; "
                                 f"use one of: {', '.join(names)}")
        groups = sorted(set(self.aliases) | set(tiers))
        for name in gw.quality_floors:
            if name not in groups:
                raise ValueError(f"gateway.quality_floors.{name}: '{name}' is neither an alias nor a "
                                 f"tier; use one of: {', '.join(groups)}")
        if gw.default_tier is not None and gw.default_tier not in tiers:
            raise ValueError(f"gateway.default_tier '{gw.default_tier}' is not a tier of any backend; "
                             f"use one of: {', '.join(tiers)}")

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def tiers(self) -> dict[str, list[str]]:
        """Tier name -> backends in that tier (tiers act as aliases too)."""
        out: dict[str, list[str]] = {}
        for b in self.backends:
            out.setdefault(b.tier, []).append(b.name)
        return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing; add it"
        elif e["type"] == "literal_error":
            msg += f" (got {e.get('input')!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "models.yaml") -> HybridserveConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with a `backends:` list at the top")
    try:
        return HybridserveConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | os.PathLike = "models.yaml", profile: str | None = None) -> HybridserveConfig:
    """Load models.yaml; `profile` selects a section under `profiles:` when the file has them."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found; pass --config PATH or create models.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if isinstance(data, dict) and "profiles" in data:
        profiles = data["profiles"] or {}
        name = profile or data.get("default_profile") or next(iter(profiles), None)
        if name not in profiles:
            raise ConfigError(f"{p}: profile '{name}' not found; known: {', '.join(profiles)}")
        return parse_config(profiles[name], f"{p} (profile {name})")
    if profile:
        raise ConfigError(f"{p}: has no `profiles:` section, so --profile {profile} cannot apply")
    return parse_config(data, str(p))
