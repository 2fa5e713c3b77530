"""The routing policy: think or not (and the budget) before generating, escalate or not after. Saved as router.json.

Before generating, `decide_think` turns cheap prompt features (`features.py`) into
p_hard = P(the student is wrong when it answers directly) with a tiny logistic
regression trained in the build on the student's own outcomes, and thinks when
p_hard ≥ `think.threshold`.

After the student answers, `confidence` maps the answer's token log-prob statistics
(mean, minimum, low quantile) to a raw score with a logistic regression and then to a
calibrated P(correct) with an isotonic map, both fitted on the calibration split;
`should_escalate` hands the request to the large model when that is below
`escalation_threshold`, which the build chose for the user's target.

`RoutingPolicy.default()` is the fallback for a build without router.json
(uncalibrated): it never thinks on its own, takes the geometric-mean token probability
as confidence, roughly (sigmoid(4·mean log-prob + 2)), and escalates below 0.5, i.e.
when the mean token log-prob is under −0.5.

Modes are set by the assistant prefix (`edgedistill.data.tasks.THINK_PREFIX` / `NO_THINK_PREFIX`):
"on" starts the answer with "<think>\\n", "off" with "Answer:".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..artifacts import atomic_write_json
from ..errors import RoutingError
from .features import FEATURE_NAMES, prompt_features
from .fit import sigmoid

ROUTER_FILE = "router.json"
FORMAT = "edgedistill-router"
CONFIDENCE_STATS = ["mean", "min", "low_quantile"]


@dataclass
class ThinkDecision:
    mode: Literal["on", "off"]
    budget: int | None          # max thinking tokens when mode == "on" (None = unlimited)
    p_hard: float               # difficulty classifier's P(student wrong without thinking), 0..1
    reason: str                 # short human text, e.g. "p_hard 0.71 >= 0.40: think, budget 256"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ThinkSpec(_Strict):
    features: list[str] = Field(default_factory=lambda: list(FEATURE_NAMES))
    mean: list[float] = Field(default_factory=lambda: [0.0] * len(FEATURE_NAMES))
    scale: list[float] = Field(default_factory=lambda: [1.0] * len(FEATURE_NAMES))
    weights: list[float] = Field(default_factory=lambda: [0.0] * len(FEATURE_NAMES))
    bias: float = 0.0
    threshold: float = Field(1.0, ge=0.0, le=1.0, description="think when p_hard >= threshold (1.0: never)")
    budget: int | None = Field(None, ge=1, description="max thinking tokens (None: unlimited)")

    @model_validator(mode="after")
    def _shapes(self) -> "ThinkSpec":
        if self.features != FEATURE_NAMES:
            raise ValueError(f"features {self.features} are not this version's {FEATURE_NAMES}; rebuild the router "
                             "(rerun the build's routing stage)")
        for name in ("mean", "scale", "weights"):
            if len(getattr(self, name)) != len(self.features):
                raise ValueError(f"think.{name} has {len(getattr(self, name))} values, expected one per feature "
                                 f"({len(self.features)})")
        if any(s <= 0 for s in self.scale):
            raise ValueError("think.scale values must be > 0")
        return self


class ConfidenceSpec(_Strict):
    stats: list[str] = Field(default_factory=lambda: list(CONFIDENCE_STATS))
    low_quantile: float = Field(0.1, gt=0.0, lt=0.5)
    weights: list[float] = Field(default_factory=lambda: [4.0, 0.0, 0.0])
    bias: float = 2.0
    # Isotonic map from the raw score sigmoid(weights · stats + bias) to P(correct): identity when uncalibrated.
    iso_x: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    iso_y: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=1)
    # Equal isotonic values keep the raw score's order, so a threshold can land inside a pooled block.
    tie_break: float = Field(1e-3, ge=0.0, le=0.01)

    @model_validator(mode="after")
    def _shapes(self) -> "ConfidenceSpec":
        if self.stats != CONFIDENCE_STATS:
            raise ValueError(f"stats {self.stats} are not {CONFIDENCE_STATS}; rebuild the router")
        if len(self.weights) != len(self.stats):
            raise ValueError(f"confidence.weights has {len(self.weights)} values, expected {len(self.stats)}")
        if len(self.iso_x) != len(self.iso_y):
            raise ValueError(f"confidence.iso_x ({len(self.iso_x)}) and iso_y ({len(self.iso_y)}) differ in length")
        if any(b <= a for a, b in zip(self.iso_x, self.iso_x[1:])):
            raise ValueError("confidence.iso_x must increase strictly")
        if any(b < a for a, b in zip(self.iso_y, self.iso_y[1:])):
            raise ValueError("confidence.iso_y must not decrease (isotonic map)")
        if any(not 0.0 <= v <= 1.0 for v in self.iso_y):
            raise ValueError("confidence.iso_y values are probabilities, expected within [0, 1]")
        return self


class Target(_Strict):
    kind: Literal["target_accuracy_ratio", "max_escalation_rate", "token_budget"]
    value: float = Field(gt=0.0)


class RoutingPolicy(_Strict):
    format: Literal["edgedistill-router"] = FORMAT
    version: Literal[1] = 1
    calibrated: bool = False
    think: ThinkSpec = Field(default_factory=ThinkSpec)
    confidence_map: ConfidenceSpec = Field(default_factory=ConfidenceSpec)
    escalation_threshold: float = Field(0.5, ge=0.0, le=1.01, description="escalate when confidence < this")
    escalate_think: Literal["on", "off"] | None = Field(
        None, description="think mode of the large model on an escalated request whose mode the policy chose (the "
                          "teacher's better mode on calibration); None: the small model's mode")
    target: Target | None = None
    calibration: dict[str, Any] = Field(default_factory=dict, description="what the build measured (free form)")

    # ------------------------------------------------------------ files
    @classmethod
    def default(cls) -> "RoutingPolicy":
        return cls()

    @classmethod
    def load(cls, path) -> "RoutingPolicy":
        p = Path(path)
        if p.is_dir():
            p = p / ROUTER_FILE
        if not p.is_file():
            raise RoutingError(f"router file '{p}' does not exist. Build with routing enabled (recipe `routing:`), "
                               "or serve without it to use the default policy.")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RoutingError(f"router file '{p}' is not valid JSON ({e}). Rebuild it (rerun the build's routing "
                               "stage) or delete it to use the default policy.") from None
        if not isinstance(data, dict):
            raise RoutingError(f"router file '{p}': expected a JSON object at the top level, got {type(data).__name__}.")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"]) or "<top level>"
                msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                lines.append(f"field '{loc}': {msg}")
            raise RoutingError(f"router file '{p}' is invalid: " + "; ".join(lines) +
                               ". Rebuild it (rerun the build's routing stage).") from None

    def save(self, path) -> None:
        p = Path(path)
        atomic_write_json(p / ROUTER_FILE if p.is_dir() else p, self.model_dump(mode="json"))

    def to_dict(self) -> dict:
        """What a route explanation may quote: thresholds, target and how the calibration went."""
        return {"calibrated": self.calibrated, "escalation_threshold": self.escalation_threshold,
                "think_threshold": self.think.threshold, "think_budget": self.think.budget,
                "escalate_think": self.escalate_think,
                "target": self.target.model_dump() if self.target else None,
                "calibration": self.calibration}

    # ------------------------------------------------------------ decisions
    def p_hard(self, prompt: str) -> float:
        t = self.think
        z = (prompt_features(prompt) - np.array(t.mean)) / np.array(t.scale) @ np.array(t.weights) + t.bias
        return float(sigmoid(z))

    def decide_think(self, prompt: str) -> ThinkDecision:
        p, t = self.p_hard(prompt), self.think
        if p >= t.threshold:
            budget = f"budget {t.budget}" if t.budget else "no budget"
            return ThinkDecision("on", t.budget, p, f"p_hard {p:.2f} >= {t.threshold:.2f}: think, {budget}")
        why = "uncalibrated default: answer directly" if not self.calibrated else \
            f"p_hard {p:.2f} < {t.threshold:.2f}: answer directly"
        return ThinkDecision("off", None, p, why)

    def logprob_stats(self, token_logprobs: Sequence[float]) -> np.ndarray:
        lp = np.nan_to_num(np.asarray(token_logprobs, dtype=np.float64), nan=-100.0, neginf=-100.0, posinf=0.0)
        lp = np.minimum(lp, 0.0)
        return np.array([lp.mean(), lp.min(), np.quantile(lp, self.confidence_map.low_quantile)])

    def raw_confidence(self, token_logprobs: Sequence[float]) -> float:
        return float(sigmoid(self.logprob_stats(token_logprobs) @ np.array(self.confidence_map.weights) + self.confidence_map.bias))

    def confidence(self, token_logprobs: Sequence[float]) -> float:
        """Calibrated P(the answer is correct) from the log-probs of every token the small model generated for
        this answer (thinking included); 0.0 for an empty answer (nothing to trust)."""
        if len(token_logprobs) == 0:
            return 0.0
        return self.calibrate_score(self.raw_confidence(token_logprobs))

    def calibrate_score(self, raw: float) -> float:
        """(1 − ε)·isotonic(raw) + ε·raw: the calibrated value, with ties inside a pooled block kept in raw order."""
        eps = self.confidence_map.tie_break
        c = (1.0 - eps) * float(np.interp(raw, self.confidence_map.iso_x, self.confidence_map.iso_y)) + eps * raw
        return min(1.0, max(0.0, c)) if math.isfinite(c) else 0.0

    def should_escalate(self, confidence: float) -> bool:
        return confidence < self.escalation_threshold
