"""What can go wrong with a request: the error classes a failure is recorded under (and which of them
are retried, fail over or are a transport failure), the exceptions a stage sees, the classification of
an SDK exception, and the one line for an answer no retry can fix (the API key masked)."""

from __future__ import annotations

import json
import re

import aiohttp
import openai

from pipeline.core.config import ModelPreset
from pipeline.engines.llm.protocol import resolve_api_key

# Error classes recorded when a request finally fails, and whether they are retried.
RETRYABLE = {"rate_limit", "server_error", "timeout", "connection", "malformed_response"}
# Errors that say the endpoint (not the request, not the account's rate) is in trouble: fail over.
ENDPOINT_ERRORS = {"server_error", "timeout", "connection"}
# Failures a re-run can cure: the request was fine, the endpoint or the network was not. Never a final
# answer (a rejected record, a wrong answer): the stage stops unless client.max_failed_fraction allows them.
# "not_sent": left unsent once the endpoint was found down; "batch_*": a Batch API item that expired,
# was cancelled or never came back.
TRANSPORT = RETRYABLE | {"not_sent", "batch_expired", "batch_cancelled", "batch_failed", "batch_missing"}


class BudgetExhausted(RuntimeError):
    """The budget cap is reached: no new request is sent."""


class LLMError(RuntimeError):
    """A stage's requests cannot all be answered; the message is the one line the user sees."""


class EndpointRejected(LLMError):
    """An answer no retry can fix (401/403 key, 404 model or URL, 400/422 request shape): the run stops at once."""


class RequestsFailed(LLMError):
    """Requests failed for a transport reason after their retries, more than client.max_failed_fraction allows."""


_KEY_LIKE = re.compile(r"\b((?:sk|Bearer)[-_ ]?[A-Za-z0-9]{0,4})[A-Za-z0-9_\-*]{8,}")


def scrub(text: str, key: str | None = None) -> str:
    """`text` with the API key, and anything shaped like a key, masked: what a server says may quote it."""
    if key and len(key) >= 4 and key != "not-needed":
        text = text.replace(key, "***")
    return _KEY_LIKE.sub(r"\1***", text)


def is_fatal(err: str) -> bool:
    """An HTTP answer no retry can fix: any 4xx but 408 (timeout) and 429 (rate), which are retried."""
    return err.startswith("http_") and err[5:].isdigit() and 400 <= int(err[5:]) < 500


def rejection(preset: ModelPreset, url: str, status: int | str, said: str, what: str = "") -> EndpointRejected:
    """The one line for an answer no retry can fix: preset, URL, status, what the server said, what to check."""
    hints = {401: f"check the API key in ${preset.api_key_env}" if preset.api_key_env else "the endpoint wants a key",
             403: f"the key in ${preset.api_key_env} may not use this model or endpoint" if preset.api_key_env
             else "the endpoint refused access",
             404: f"check the model '{preset.model}' and the base URL",
             400: "the endpoint refused the request's shape", 422: "the endpoint refused the request's shape"}
    code = int(status) if str(status).isdigit() else 0
    hint = hints.get(code, "no retry can fix it")
    said = scrub(" ".join(str(said).split()), resolve_api_key(preset, missing_ok=True))[:300]
    verb = f"answered HTTP {status}" if code else str(status)
    return EndpointRejected(f"preset '{preset.name}' at {url} {verb}{what}: {said or '(no message)'}; "
                            f"{hint}; stopped without retrying")


def _server_said(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    try:
        return exc.response.text[:300] if exc.response is not None else str(exc)
    except Exception:  # a streamed or closed body
        return str(exc)


def _classify(exc: BaseException) -> tuple[str, float | None]:
    """(error class, Retry-After seconds if the server sent one)."""
    if isinstance(exc, openai.APIStatusError):
        retry_after = None
        header = exc.response.headers.get("retry-after") if exc.response is not None else None
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        if exc.status_code == 429:
            return "rate_limit", retry_after
        if exc.status_code == 408:
            return "timeout", retry_after
        if exc.status_code >= 500:
            return "server_error", retry_after
        return f"http_{exc.status_code}", None
    if isinstance(exc, openai.APITimeoutError):
        # The aiohttp transport reports a refused connection as a connect timeout: look at the cause.
        cause = exc.__cause__ or exc.__context__
        while cause is not None:
            if isinstance(cause, (ConnectionError, aiohttp.ClientConnectorError)):
                return "connection", None
            cause = cause.__cause__ or cause.__context__
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError, ValueError, KeyError, TypeError)):
        return "malformed_response", None
    return type(exc).__name__, None
