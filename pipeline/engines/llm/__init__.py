"""The one LLM client: every text generation in the project goes through it.

It speaks the OpenAI protocol (the `openai` package) to any endpoint: a managed local
llama.cpp or vLLM server, the OpenAI API, or any compatible base URL. On top it adds what
a long synthetic-data run needs:

- bounded concurrency and a token bucket on requests and tokens per minute;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, dropped
  connections and malformed responses, honouring Retry-After, then a recorded failure;
- a content-addressed request cache in SQLite (WAL), durable across kill -9: a resumed
  run re-sends nothing that succeeded, and a re-run with the same config sends nothing;
- a usage ledger (tokens and cost of every paid attempt) and a budget cap that counts what the
  requests in flight may still cost, so a run never spends past it;
- an answer cut at max_tokens is asked again only where that can change it: with another seed
  when sampling, never under greedy decoding (`length_retry`).
- several endpoints serving one model (replicas): each request goes to the live one with the
  fewest in flight; one that fails is left out for a cooldown and the request goes at once to
  another (`Endpoints`), so a server that dies mid-run loses nothing and slows nothing for long.
- a failure policy (`LLMSession`, the one entry every stage calls): a request that fails for a
  transport reason after its retries (TRANSPORT) is never a final answer: the stage finishes the
  others, caches every answer, and stops with one line naming the endpoint, the error kinds and
  "run again: only the N failed requests are sent" (`RequestsFailed`), unless
  client.max_failed_fraction accepts the loss. Once a request has used up its retries with no
  request answered since it was first sent, the endpoint is down: the requests not yet sent are
  not sent (`not_sent`), so a run against a dead endpoint stops in one request's retry span. An
  answer no retry can fix (401/403 key, 404 model or URL, 400 request shape) stops the run at once,
  naming the preset, the URL and what the server said, never the key (`EndpointRejected`).
- the OpenAI Batch API (`client.batch`, pipeline/engines/batch.py): the same requests, cache and
  ledger, at the batch price.

The cache key is the model's identity (weights, engine and its version, every server setting
that can change a completion: `ModelPreset.identity`), the api, the exact messages or prompt
and every sampling parameter, the seed included; not the port, log path or worker count.

Own code, not libraries, for two small pieces: the token bucket, because aiolimiter cannot hand
back an over-estimated token charge once the response's real usage is known; the retry loop
(~25 lines), because each attempt feeds the ledger, that correction and the length-retry rule,
which tenacity's callbacks would split across four hooks.

The package's modules: `protocol` (LLMRequest, LLMResult, the request key,
the body sent and the answer parsed), `errors` (error classes, exceptions, classification), `cache`
(RequestCache, lookup), `budget` (TokenBucket, Ledger, worst_case_usd), `client` (Endpoints,
LLMClient) and `session` (LLMSession, Outcome). Everything is re-exported here.

    python -c "import asyncio; from pipeline.engines.llm import *; print(request_key('m', 'chat', [{'role':'user','content':'hi'}], None, {}))"
"""

from pipeline.engines import versions as _versions  # noqa: F401  (ModelPreset.identity() needs the engine versions)
from pipeline.engines.llm.budget import Ledger, TokenBucket, worst_case_usd
from pipeline.engines.llm.cache import RequestCache, lookup
from pipeline.engines.llm.client import Endpoints, LLMClient
from pipeline.engines.llm.errors import (
    ENDPOINT_ERRORS,
    RETRYABLE,
    TRANSPORT,
    BudgetExhausted,
    EndpointRejected,
    LLMError,
    RequestsFailed,
    is_fatal,
    rejection,
    scrub,
)
from pipeline.engines.llm.protocol import (
    LLMRequest,
    LLMResult,
    length_retry,
    parse_answer,
    request_body,
    request_key,
    resolve_api_key,
)
from pipeline.engines.llm.session import LLMSession, Outcome

__all__ = [
    "ENDPOINT_ERRORS",
    "RETRYABLE",
    "TRANSPORT",
    "BudgetExhausted",
    "EndpointRejected",
    "Endpoints",
    "LLMClient",
    "LLMError",
    "LLMRequest",
    "LLMResult",
    "LLMSession",
    "Ledger",
    "Outcome",
    "RequestCache",
    "RequestsFailed",
    "TokenBucket",
    "is_fatal",
    "length_retry",
    "lookup",
    "parse_answer",
    "rejection",
    "request_body",
    "request_key",
    "resolve_api_key",
    "scrub",
    "worst_case_usd",
]
