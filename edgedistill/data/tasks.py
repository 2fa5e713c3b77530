"""A built-in reasoning suite: seeded problems with exact answers and gold step-by-step solutions.

Four kinds, each at difficulty 1–5 (more steps, longer lists, more people as it grows):
multi-step arithmetic word problems, unit and time conversion, list operations
(max, counting, sorting, sums of evens) and ordering logic.

One answer format: the answer ends with a line `Answer: X`. A thinking sample is
`<think>\\n{gold steps}\\n</think>\\n\\nAnswer: X`; a direct sample carries an empty think
block, `<think>\\n\\n</think>\\n\\nAnswer: X` (Qwen3's convention), so the mode is set by
the assistant prefix alone: "on" = THINK_PREFIX, "off" = NO_THINK_PREFIX.

Splits are disjoint by construction: a question lands in train, calibration or test
by a hash of its text, so the same question can never appear in two splits.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from ..artifacts import atomic_write_text
from ..errors import DataError

KINDS = ["arithmetic", "units", "lists", "logic"]
SPLITS = ["train", "calib", "test"]
THINK_PREFIX = "<think>\n"
NO_THINK_PREFIX = "<think>\n\n</think>\n\n"
Mode = Literal["on", "off"]


@dataclass
class Problem:
    id: str
    kind: str
    difficulty: int
    question: str
    answer: str
    steps: list[str] = field(default_factory=list)

    def target(self, mode: Mode) -> str:
        """The assistant's text for this problem in a thinking ("on") or direct ("off") sample."""
        if mode == "on":
            return f"{THINK_PREFIX}" + "\n".join(self.steps) + f"\n</think>\n\nAnswer: {self.answer}"
        return f"{NO_THINK_PREFIX}Answer: {self.answer}"

    def chat(self, mode: Mode) -> dict:
        return {"messages": [{"role": "user", "content": self.question},
                             {"role": "assistant", "content": self.target(mode)}]}


# ------------------------------------------------------------------ generators
_NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Tom", "Nina", "Ben"]
_SHE = {"Mia", "Ava", "Zoe", "Lena", "Sara", "Nina"}
_THINGS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cards", "shells"]


def _arithmetic(rng: random.Random, d: int) -> tuple[str, str, list[str]]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    value = rng.randint(3, 12 + 4 * d)
    text, steps = [f"{name} has {value} {thing}."], [f"Start with {value}."]
    he = "she" if name in _SHE else "he"
    for i in range(d):
        op = rng.choice(["add", "sub", "mul"] + (["div"] if d >= 3 else []))
        if op == "sub" and value < 2:
            op = "add"
        if op == "div" and not [k for k in (2, 3, 4) if value % k == 0]:
            op = "add"
        if op == "mul" and value > 60:
            op = "sub"
        then = "Then " if i else ""
        if op == "add":
            k = rng.randint(2, 9 + 3 * d)
            text.append(f"{then}{he if then else he.capitalize()} gets {k} more.")
            steps.append(f"{value} + {k} = {value + k}.")
            value += k
        elif op == "sub":
            k = rng.randint(1, min(value - 1, 9 + 3 * d))
            text.append(f"{then}{he if then else he.capitalize()} gives away {k}.")
            steps.append(f"{value} - {k} = {value - k}.")
            value -= k
        elif op == "mul":
            k = rng.choice([2, 3]) if d < 4 else rng.choice([2, 3, 4])
            word = {2: "doubles", 3: "triples", 4: "grows four times"}[k]
            text.append(f"{then}{'t' if then else 'T'}he number of {thing} {word}.")
            steps.append(f"{value} * {k} = {value * k}.")
            value *= k
        else:
            k = rng.choice([k for k in (2, 3, 4) if value % k == 0])
            text.append(f"{then}{he if then else he.capitalize()} shares them equally among {k} friends and keeps one share.")
            steps.append(f"{value} / {k} = {value // k}.")
            value //= k
    text.append(f"How many {thing} does {name} have now?")
    return " ".join(text), str(value), steps


def _clock(minutes: int) -> str:
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


def _units(rng: random.Random, d: int) -> tuple[str, str, list[str]]:
    if d == 1:
        unit, per, small = rng.choice([("hours", 60, "minutes"), ("minutes", 60, "seconds"), ("km", 1000, "meters"),
                                       ("kg", 1000, "grams"), ("days", 24, "hours")])
        n = rng.randint(2, 60)
        return f"How many {small} are in {n} {unit}?", str(n * per), [f"{n} * {per} = {n * per}."]
    if d == 2:
        big, per, small = rng.choice([("minutes", 60, "seconds"), ("hours", 60, "minutes"), ("km", 1000, "meters")])
        n, m = rng.randint(2, 9), rng.randint(5, per - 1)
        return (f"How many {small} are in {n} {big} and {m} {small}?", str(n * per + m),
                [f"{n} * {per} = {n * per}.", f"{n * per} + {m} = {n * per + m}."])
    if d == 3:
        start, dur = rng.randint(6 * 60, 20 * 60), rng.randint(61, 179)
        h, m = divmod(dur, 60)
        return (f"A film starts at {_clock(start)} and lasts {dur} minutes. At what time does it end?",
                _clock(start + dur), [f"{dur} minutes = {h} h {m} min.", f"{_clock(start)} + {h} h = {_clock(start + 60 * h)}.",
                                      f"{_clock(start + 60 * h)} + {m} min = {_clock(start + dur)}."])
    if d == 4:
        a, b = rng.randint(5 * 60, 11 * 60), rng.randint(12 * 60, 22 * 60)
        ha, ma, hb, mb = a // 60, a % 60, b // 60, b % 60
        return (f"How many minutes are there from {_clock(a)} to {_clock(b)}?", str(b - a),
                [f"{_clock(b)} is {hb} * 60 + {mb} = {b} minutes.", f"{_clock(a)} is {ha} * 60 + {ma} = {a} minutes.",
                 f"{b} - {a} = {b - a}."])
    laps, km, m = rng.randint(2, 5), rng.randint(1, 3), rng.randint(10, 95) * 10
    one = km * 1000 + m
    return (f"A runner does {laps} laps of {km} km {m} m each. How many meters are run in total?", str(laps * one),
            [f"{km} km = {km * 1000} m.", f"{km * 1000} + {m} = {one} m per lap.", f"{laps} * {one} = {laps * one}."])


def _lists(rng: random.Random, d: int) -> tuple[str, str, list[str]]:
    n = 3 + d
    xs = [rng.randint(1, 9 + 10 * (d // 2)) for _ in range(n)]
    shown = ", ".join(map(str, xs))
    if d == 1:
        steps, best = [], xs[0]
        for x in xs[1:]:
            steps.append(f"max({best}, {x}) = {max(best, x)}.")
            best = max(best, x)
        return f"What is the largest number in the list {shown}?", str(best), steps
    if d == 2:
        target = rng.choice(xs)
        xs[rng.randrange(n)] = target
        shown = ", ".join(map(str, xs))
        hits = [i + 1 for i, x in enumerate(xs) if x == target]
        return (f"How many times does {target} appear in the list {shown}?", str(len(hits)),
                [f"{target} is at positions {', '.join(map(str, hits))}.", f"That is {len(hits)} times."])
    if d == 4:
        evens = [x for x in xs if x % 2 == 0] or [2]
        if evens == [2] and 2 not in xs:
            xs[0] = 2
            shown = ", ".join(map(str, xs))
        steps, total = [f"Even numbers: {', '.join(map(str, evens))}."], evens[0]
        for x in evens[1:]:
            steps.append(f"{total} + {x} = {total + x}.")
            total += x
        return f"What is the sum of the even numbers in the list {shown}?", str(total), steps
    desc = d == 5 and rng.random() < 0.5
    rest, steps, out = list(xs), [], []
    while rest:
        pick = max(rest) if desc else min(rest)
        rest.remove(pick)
        out.append(pick)
        steps.append(f"{'largest' if desc else 'smallest'} left: {pick}.")
    order = "descending" if desc else "ascending"
    return f"Sort the list {shown} in {order} order.", ", ".join(map(str, out)), steps


_RELATIONS = [("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest")]


def _logic(rng: random.Random, d: int) -> tuple[str, str, list[str]]:
    people = rng.sample(_NAMES, d + 1)  # people[0] has the most of the quality
    comp, top, bottom = rng.choice(_RELATIONS)
    facts = [f"{people[i]} is {comp} than {people[i + 1]}." for i in range(d)]
    rng.shuffle(facts)
    chain = " > ".join(people)
    steps = [f"{people[i]} > {people[i + 1]}." for i in range(d)] + [f"Order: {chain}."]
    if d >= 3 and rng.random() < 0.5:
        i, j = sorted(rng.sample(range(d + 1), 2))
        a, b = (people[i], people[j]) if rng.random() < 0.5 else (people[j], people[i])
        yes = people.index(a) < people.index(b)
        return (" ".join(facts) + f" Is {a} {comp} than {b}? Answer yes or no.", "yes" if yes else "no",
                steps + [f"{a} is {'before' if yes else 'after'} {b} in the order, so {'yes' if yes else 'no'}."])
    ask_top = rng.random() < 0.5
    who = people[0] if ask_top else people[-1]
    return (" ".join(facts) + f" Who is the {top if ask_top else bottom}?", who,
            steps + [f"The {top if ask_top else bottom} is {who}."])


GENERATORS: dict[str, Callable[[random.Random, int], tuple[str, str, list[str]]]] = {
    "arithmetic": _arithmetic, "units": _units, "lists": _lists, "logic": _logic}


def make_problem(kind: str, difficulty: int, rng: random.Random) -> Problem:
    if kind not in GENERATORS:
        raise DataError(f"unknown problem kind '{kind}'; expected one of {KINDS}.")
    if not 1 <= difficulty <= 5:
        raise DataError(f"difficulty {difficulty} is out of range; expected 1 to 5.")
    q, a, steps = GENERATORS[kind](rng, difficulty)
    pid = hashlib.sha256(q.encode()).hexdigest()[:12]
    return Problem(pid, kind, difficulty, q, a, steps)


def split_of(question: str, fractions: tuple[float, float] = (0.6, 0.2)) -> str:
    """train / calib / test by a hash of the text: the same question always lands in the same split."""
    u = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < fractions[0] else "calib" if u < fractions[0] + fractions[1] else "test"


def generate_suite(sizes: dict[str, int], seed: int = 0, kinds: list[str] | None = None) -> dict[str, list[Problem]]:
    """`sizes` problems per split (keys from SPLITS), balanced over kinds × difficulties, deterministic by seed."""
    kinds = kinds or KINDS
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}.")
    cells = [(k, d) for d in range(1, 6) for k in kinds]
    # Per split, an equal share of every (kind, difficulty) cell (the first cells take the remainder).
    quota = {s: {c: n // len(cells) + (i < n % len(cells)) for i, c in enumerate(cells)} for s, n in sizes.items()}
    out: dict[str, list[Problem]] = {s: [] for s in sizes}
    seen: set[str] = set()
    rng = random.Random(f"edgedistill-tasks:{seed}")
    for cell in cells:
        misses = 0
        while any(quota[s][cell] for s in sizes):
            p = make_problem(*cell, rng)
            s = split_of(p.question)
            if p.question in seen or s not in quota or not quota[s][cell]:
                misses += 1
                if misses > 2000 + 50 * sum(sizes.values()):
                    raise DataError(f"could not generate enough distinct {cell[0]} problems of difficulty {cell[1]} "
                                    f"for {sizes}; ask for fewer.")
                continue
            seen.add(p.question)
            out[s].append(p)
            quota[s][cell] -= 1
    for s in out:  # interleave kinds and difficulties, deterministically
        random.Random(f"{seed}:{s}").shuffle(out[s])
    return out


def write_jsonl(problems: list[Problem], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(p)) + "\n" for p in problems))


def read_jsonl(path: str | Path) -> list[Problem]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(Problem(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise DataError(f"{path}:{i}: not a problem record ({e}); expected the fields of "
                                "edgedistill.data.tasks.Problem.") from None
    return out


# ------------------------------------------------------------------ scoring
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final answer: the last `Answer: X` line after any think block; else the last line of the answer part."""
    tail = text.rsplit("</think>", 1)[-1] if "</think>" in text else \
        ("" if "<think>" in text else text)  # an unfinished think block has no answer
    hits = _ANSWER.findall(tail)
    if hits:
        return hits[-1].strip()
    lines = [ln.strip() for ln in tail.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def normalize(ans: str) -> str:
    a = ans.strip().lower().replace("**", "").replace("`", "")
    a = a.strip(" .!\"'[]()")
    a = re.sub(r"\s*,\s*", ", ", a)
    a = re.sub(r"\s+", " ", a)
    if re.fullmatch(r"-?\d+(\.0+)?", a):
        a = str(int(float(a)))
    return a


def score(text: str, answer: str) -> bool:
    got = extract_answer(text)
    return got is not None and normalize(got) == normalize(answer)


# ------------------------------------------------------------------ rendering
def render_prompt(tokenizer, question: str, mode: Mode) -> str:
    """The chat-templated prompt with the generation prompt and the mode's assistant prefix."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return text + (THINK_PREFIX if mode == "on" else NO_THINK_PREFIX)
