"""OpenAI parameters to pdgrpc's domain requests, and the router's events back to OpenAI objects.

A request becomes one ``GenerateRequest`` per choice: every prompt of a completions request times
``n`` (choice index ``prompt_index * n + j``, as OpenAI and vLLM number them), each a request of its
own to the cluster. With a ``seed``, choice j samples with ``seed + j``: reproducible, and the n
samples differ. Defaults are OpenAI's (temperature 1, top_p 1; completions max_tokens 16), not
pdgrpc's greedy ones. Finish reasons: EOS and stop strings are ``stop``, the token limit ``length``.

Log probabilities are the sampled token's only (pdgrpc does not return alternatives; asking for
them is a 400). A token's text is the text its delta added; when the decode node sent several tokens
in one message (``stream_interval`` or a busy coordinator) the first carries the message's text and
the others "", so the tokens still join to the answer.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pdgrpc.openai_api import models as m
from pdgrpc.openai_api.errors import bad_param
from pdgrpc.types import (
    ChatMessage,
    FinishReason,
    GenerateDelta,
    GenerateFinal,
    GenerateRequest,
    Prompt,
    SamplingParams,
)

FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
_OFF_VALUES = (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0))


def refuse_unsupported(req: m.CompletionRequest | m.ChatCompletionRequest) -> None:
    """A 400 naming the first parameter set to something pdgrpc does not do."""
    if req.stream_options is not None and not req.stream:
        raise bad_param("stream_options", "stream_options is only allowed when stream is true")
    for name, off in _OFF_VALUES:
        value = getattr(req, name)
        if value is not None and value != off:
            raise bad_param(name, f"{name} is not supported by pdgrpc; only {off} (no penalty) is accepted")
    if req.logit_bias:
        raise bad_param("logit_bias", "logit_bias is not supported by pdgrpc")
    if isinstance(req, m.CompletionRequest):
        if req.echo:
            raise bad_param("echo", "echo is not supported by pdgrpc")
        if req.suffix is not None:
            raise bad_param("suffix", "suffix is not supported by pdgrpc")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_param("best_of", "best_of is not supported by pdgrpc (only best_of = n)")
        if req.logprobs:
            raise bad_param("logprobs", "pdgrpc returns the sampled token's log probability only: use logprobs=0")
        return
    if req.top_logprobs:
        raise bad_param("top_logprobs", "pdgrpc returns the sampled token's log probability only: "
                                        "top_logprobs must be 0")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_param("top_logprobs", "top_logprobs needs logprobs set to true")
    if req.response_format not in (None, {"type": "text"}):
        raise bad_param("response_format", "only response_format {\"type\": \"text\"} is supported by pdgrpc")
    if req.tools:
        raise bad_param("tools", "tools are not supported by pdgrpc")
    if req.tool_choice not in (None, "none"):
        raise bad_param("tool_choice", "tool_choice is not supported by pdgrpc (only \"none\")")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_param("max_tokens", "max_tokens and max_completion_tokens differ; send one")


def prompts_of(req: m.CompletionRequest | m.ChatCompletionRequest) -> list[Prompt]:
    if isinstance(req, m.ChatCompletionRequest):
        chat = tuple(ChatMessage("system" if msg.role == "developer" else msg.role, msg.text()) for msg in req.messages)
        return [Prompt(chat=chat)]
    p = req.prompt
    if isinstance(p, str):
        return [Prompt(text=p)]
    if all(isinstance(x, int) for x in p):
        return [Prompt(token_ids=tuple(p))]
    return [Prompt(text=x) if isinstance(x, str) else Prompt(token_ids=tuple(x)) for x in p]


def max_tokens_of(req: m.CompletionRequest | m.ChatCompletionRequest) -> int:
    if isinstance(req, m.ChatCompletionRequest):
        return req.max_completion_tokens or req.max_tokens or m.DEFAULT_CHAT_MAX_TOKENS
    return req.max_tokens or m.DEFAULT_COMPLETION_MAX_TOKENS


def sampling_of(req: m.CompletionRequest | m.ChatCompletionRequest, j: int) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    logprobs = req.logprobs is not None if isinstance(req, m.CompletionRequest) else req.logprobs
    return SamplingParams(
        max_tokens=max_tokens_of(req), temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
        seed=None if req.seed is None else req.seed + j, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs)


def generate_requests(req: m.CompletionRequest | m.ChatCompletionRequest, request_id: str) -> list[GenerateRequest]:
    """One domain request per choice, in choice order."""
    refuse_unsupported(req)
    prompts = prompts_of(req)
    if len(prompts) * req.n > m.MAX_CHOICES:
        raise bad_param("n", f"{len(prompts)} prompts x n={req.n} is more than {m.MAX_CHOICES} choices")
    samplings = [sampling_of(req, j) for j in range(req.n)]
    return [GenerateRequest(p, samplings[j], f"{request_id}-{i * req.n + j}")
            for i, p in enumerate(prompts) for j in range(req.n)]


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    max_tokens: int
    length_is_certain: bool   # ignore_eos and no stop strings: only max_tokens can end it
    text: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    n_tokens: int = 0
    final: GenerateFinal | None = None
    finish_sent: bool = False

    def add(self, delta: GenerateDelta) -> None:
        self.text.append(delta.text)
        self.n_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.tokens += [delta.text] + [""] * (len(delta.logprobs) - 1)
            self.logprobs += delta.logprobs

    def surely_last(self) -> bool:
        """The delta just added reached max_tokens and nothing else can have ended it: its chunk carries
        finish_reason "length" (as vLLM's does) instead of a chunk of its own after it."""
        return self.length_is_certain and self.n_tokens >= self.max_tokens


class Responder:
    """Builds one request's OpenAI answers: chunks as events come, or the whole response at the end."""

    def __init__(self, req: m.CompletionRequest | m.ChatCompletionRequest, request_id: str, model: str,
                 fingerprint: str | None, n_choices: int, prompts: int) -> None:
        self.chat = isinstance(req, m.ChatCompletionRequest)
        self.want_logprobs = bool(req.logprobs is not None if not self.chat else req.logprobs)
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.id, self.model, self.fingerprint = request_id, model, fingerprint
        self.created = int(time.time())
        self.n_per_prompt = n_choices // max(prompts, 1)
        certain = req.ignore_eos and not req.stop
        self.choices = [Choice(i, max_tokens_of(req), certain) for i in range(n_choices)]

    # ---- streaming ----

    def first_chunks(self) -> list[str]:
        """Chat streams open with each choice's role (OpenAI's first chunk), sent with the first token."""
        if not self.chat:
            return []
        return [self._chat_chunk(c.index, m.ChatDelta(role="assistant", content="")) for c in self.choices]

    def record(self, index: int, event: GenerateDelta | GenerateFinal) -> None:
        """One router event into its choice (for the whole answer at the end)."""
        c = self.choices[index]
        if isinstance(event, GenerateFinal):
            c.final = event
        else:
            c.add(event)

    def on_event(self, index: int, event: GenerateDelta | GenerateFinal) -> str | None:
        """The chunk for one router event, or None when there is nothing to send."""
        c = self.choices[index]
        self.record(index, event)
        if isinstance(event, GenerateFinal):
            if c.finish_sent:
                return None
            c.finish_sent = True
            return self._chunk(c, "", (), FINISH.get(event.finish_reason))
        finish = None
        if c.surely_last():
            c.finish_sent, finish = True, "length"
        return self._chunk(c, event.text, event.logprobs, finish, event)

    def usage_chunk(self) -> str | None:
        if not self.include_usage:
            return None
        cls = m.ChatCompletionChunk if self.chat else m.CompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                   choices=[], usage=self.usage()).model_dump_json()

    def _chunk(self, c: Choice, text: str, logprobs, finish: str | None, delta: GenerateDelta | None = None) -> str:
        lp = None
        if self.want_logprobs and delta is not None:
            toks = [delta.text] + [""] * (len(logprobs) - 1)
            lp = self._logprobs(toks, list(logprobs), len("".join(c.text)) - len(text))
        if self.chat:
            return self._chat_chunk(c.index, m.ChatDelta(content=text) if delta is not None else m.ChatDelta(),
                                    lp, finish)
        body = m.CompletionResponse(id=self.id, created=self.created, model=self.model,
                                    system_fingerprint=self.fingerprint,
                                    choices=[m.CompletionChoice(index=c.index, text=text, logprobs=lp,
                                                                finish_reason=finish)])
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})

    def _chat_chunk(self, index: int, delta: m.ChatDelta, lp=None, finish: str | None = None) -> str:
        body = m.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                     system_fingerprint=self.fingerprint,
                                     choices=[m.ChatChunkChoice(index=index, delta=delta, logprobs=lp,
                                                                finish_reason=finish)])
        return body.model_dump_json(exclude=None if self.include_usage else {"usage"})

    # ---- whole answers ----

    def usage(self) -> m.Usage:
        # Each prompt counts once, however many choices it has (as OpenAI counts it).
        prompt = sum(c.final.prompt_tokens for c in self.choices
                     if c.final is not None and c.index % self.n_per_prompt == 0)
        completion = sum(c.n_tokens for c in self.choices)
        return m.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def response(self) -> m.CompletionResponse | m.ChatCompletionResponse:
        def finish(c: Choice) -> str | None:
            return FINISH.get(c.final.finish_reason) if c.final else None

        if self.chat:
            return m.ChatCompletionResponse(
                id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                usage=self.usage(), choices=[m.ChatChoice(
                    index=c.index, message=m.ChatMessageOut(content="".join(c.text)), finish_reason=finish(c),
                    logprobs=self._logprobs(c.tokens, c.logprobs, 0) if self.want_logprobs else None)
                    for c in self.choices])
        return m.CompletionResponse(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
            usage=self.usage(), choices=[m.CompletionChoice(
                index=c.index, text="".join(c.text), finish_reason=finish(c),
                logprobs=self._logprobs(c.tokens, c.logprobs, 0) if self.want_logprobs else None)
                for c in self.choices])

    def _logprobs(self, tokens: list[str], logprobs: list[float], offset: int):
        if self.chat:
            return m.ChatLogprobs(content=[m.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                           for t, lp in zip(tokens, logprobs)])
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return m.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, top_logprobs=None, text_offset=offsets)
