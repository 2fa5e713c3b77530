"""What flows between the HTTP layer and a backend: sampling settings in, generation events out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # collect the log-probability of every sampled token (for the routing confidence)
    think_open: bool = False  # the prompt ends inside an open <think> block
    think_budget: int | None = None  # thinking tokens allowed before the backend closes the block itself


@dataclass(frozen=True)
class Delta:
    """New text (possibly empty while a stop sequence is still undecided) and the tokens it took."""
    text: str
    tokens: int


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    thinking_tokens: int = 0  # tokens written inside <think>…</think>
    budget_hit: bool = False  # the thinking budget ran out and the backend closed the block
    token_logprobs: tuple[float, ...] = ()  # of the sampled tokens, when asked for (not of inserted ones)


@dataclass(frozen=True)
class Failed:
    """The generation broke off for a server-side reason (the message goes to the client)."""
    message: str
    status: int = field(default=500)


Event = Union[Delta, Finished, Failed]
