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


@dataclass(frozen=True)
class Failed:
    """The generation broke off for a server-side reason (the message goes to the client)."""
    message: str
    status: int = field(default=500)


Event = Union[Delta, Finished, Failed]
