"""llama-cpp-python's OpenAI-compatible server, with every request evaluated from an empty context.

    python -m pipeline.engines.llamacpp_server --model model.gguf --port 8000   # same flags as llama_cpp.server

Why: llama-cpp-python keeps the previous request's tokens in the KV cache and re-evaluates only
the part of a new prompt after the longest common prefix. The prompt is then processed in other
batch splits, the logits differ in the last bits, and a greedy completion can change with the
order in which a server process happened to receive requests (measured here: 3 of 10 HumanEval
completions of gemma-3-270m changed when the same prompts were sent in reverse order). Resetting
the context before each request makes a completion a function of the request alone; it costs
re-evaluating the shared prefix. `server.reuse_prompt_prefix: true` in a preset runs the stock
server instead.
"""

from __future__ import annotations

import functools

from llama_cpp import Llama

_generate = Llama.generate


@functools.wraps(_generate)
def _generate_from_empty_context(self: Llama, tokens, *args, **kwargs):
    # n_tokens = 0 skips the prefix match; eval() then clears the whole KV cache before decoding.
    self.reset()
    return _generate(self, tokens, *args, **kwargs)


Llama.generate = _generate_from_empty_context

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    main()
