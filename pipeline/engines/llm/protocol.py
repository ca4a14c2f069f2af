"""A request and its answer: LLMRequest and LLMResult, the content address a request is cached under,
the API key a preset's endpoint gets, the JSON body sent (alone or in a batch file) and the parsing of
the answer, and the request to send again after an answer cut at max_tokens (`length_retry`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config import ConfigError, ModelPreset
from pipeline.core.records import dumps, sha256_text


def request_key(model_identity: str, api: str, messages: list | None, prompt: str | None, params: dict) -> str:
    """Content address of a request: model identity, api, input and every sampling parameter (seed included)."""
    return sha256_text(dumps({"model": model_identity, "api": api, "messages": messages, "prompt": prompt, "params": params}))


def resolve_api_key(preset: ModelPreset, missing_ok: bool = False) -> str:
    """The key comes from the environment only; a remote endpoint without one fails before any work."""
    if preset.api_key_env:
        key = os.environ.get(preset.api_key_env, "")
        if not key and not missing_ok and preset.api_key_optional:  # an endpoint that may want no key
            return "not-needed"
        if not key and not missing_ok:
            raise ConfigError(
                f"preset '{preset.name}' needs an API key in the environment variable {preset.api_key_env}, which is not set"
            )
        return key
    return "not-needed"  # local servers ignore the key; the openai package insists on one


@dataclass
class LLMRequest:
    id: str
    messages: list[dict] | None = None
    prompt: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class LLMResult:
    id: str
    key: str
    choices: list[dict] = field(default_factory=list)  # [{"text": ..., "finish_reason": ...}]
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cost_usd: float = 0.0
    cached: bool = False
    attempts: int = 0
    error: str | None = None  # error class when the request finally failed
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def length_retry(req: LLMRequest, attempt: int) -> LLMRequest | None:
    """The request to send after an answer cut at max_tokens, or None when asking again cannot help.

    A server answers the same request the same way (greedy decoding, or sampling with the same
    seed), so a retry must change what decides the answer: sampling gets another seed, derived
    from the original one so a cold re-run asks the same sequence of questions. Greedy decoding
    (temperature 0) would return the same truncation, so no retry is made.
    """
    p = req.params
    if not p.get("temperature"):
        return None
    seed = (int(p.get("seed") or 0) + 1_000_003 * attempt) % (2**31)
    return dataclasses.replace(req, params={**p, "seed": seed})


def request_body(preset: ModelPreset, req: LLMRequest) -> tuple[str, dict]:
    """(path under the base URL, JSON body) of a request: the same body whether it is sent alone or in a batch file."""
    p = req.params
    body: dict[str, Any] = {"model": preset.model}
    for name in ("temperature", "top_p", "max_tokens", "n", "seed"):
        if p.get(name) is not None:
            body[name] = p[name]
    if p.get("stop"):
        body["stop"] = p["stop"]
    if preset.api == "chat":
        if preset.engine == "vllm" and req.messages[-1]["role"] == "assistant":
            # A begun answer to continue (a prefill): llama-server does so by default, vLLM when asked.
            body.update(continue_final_message=True, add_generation_prompt=False)
        return "/chat/completions", {**body, "messages": req.messages}
    return "/completions", {**body, "prompt": req.prompt}


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def parse_answer(api: str, resp: Any) -> tuple[list[dict], dict]:
    """(choices, usage) of a completion, as the SDK's model (sent alone) or a plain dict (a batch output line)."""
    choices = []
    for c in _field(resp, "choices") or []:
        text = _field(_field(c, "message") or {}, "content") if api == "chat" else _field(c, "text")
        choices.append({"text": text or "", "finish_reason": _field(c, "finish_reason")})
    if not choices:
        raise ValueError("response has no choices")
    u = _field(resp, "usage") or {}
    return choices, {"prompt_tokens": int(_field(u, "prompt_tokens") or 0),
                     "completion_tokens": int(_field(u, "completion_tokens") or 0)}
