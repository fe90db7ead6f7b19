"""A generated multi-step arithmetic word-problem task in the GSM8K format (answer after ``####``).

Every problem is a short story over one running quantity: a start value, then 2–4 operations (buy groups of
items, give some away, find more, share equally and keep one share, double). The worked solution writes each
intermediate equation and the final line is ``#### <answer>``, exactly like GSM8K::

    Question: Mia has 23 marbles. She buys 4 bags with 6 marbles in each bag. Then she gives 9 marbles to Leo.
    How many marbles does Mia have now?
    Answer: 4 * 6 = 24. 23 + 24 = 47. 47 - 9 = 38.
    #### 38

Train / held-out split: a problem is held out iff a hash of its question text falls in the held-out share, so
the same question can never be in both (checked by the tests). Scoring: exact match of the number after the
first ``####`` of a greedy completion against the gold answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

_NAMES = ["Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Ines", "Ravi", "Yuki", "Sara", "Tom", "Ana"]
_PRONOUN = {name: ("She" if name in {"Mia", "Ava", "Emma", "Zoe", "Ines", "Yuki", "Sara", "Ana"} else "He")
            for name in _NAMES}
_ITEMS = [("marbles", "bag", "bags"), ("apples", "basket", "baskets"), ("stickers", "sheet", "sheets"),
          ("pencils", "box", "boxes"), ("cards", "pack", "packs"), ("coins", "jar", "jars"),
          ("books", "shelf", "shelves"), ("shells", "bucket", "buckets")]
_ANSWER_RE = re.compile(r"####\s*(-?[\d,]+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: ``prompt`` is what the model is given, ``completion`` what it must produce."""

    question: str
    solution: str  # the worked equations
    answer: str  # the final number, as text

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"

    @property
    def completion(self) -> str:
        return f" {self.solution}\n#### {self.answer}"

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def make_problem(rng: random.Random) -> Problem:
    """Draw one problem; every intermediate value stays a non-negative integer and the answer is exact."""
    name = rng.choice(_NAMES)
    friend = rng.choice([n for n in _NAMES if n != name])
    he = _PRONOUN[name]
    item, container, containers = rng.choice(_ITEMS)
    value = rng.randint(5, 60)
    sentences = [f"{name} has {value} {item}."]
    steps: list[str] = []
    for i in range(rng.randint(2, 4)):
        then = "Then " + he.lower() if i else he
        ops = ["buy", "give", "find", "double"]
        divisors = [d for d in (2, 3, 4, 5) if value % d == 0 and value > 0]
        if divisors:
            ops.append("share")
        op = rng.choice(ops)
        if op == "give" and value == 0:
            op = "find"
        if op == "buy":
            n, m = rng.randint(2, 9), rng.randint(2, 12)
            product, new = n * m, value + n * m
            sentences.append(f"{then} buys {n} {containers} with {m} {item} in each {container}.")
            steps.append(f"{n} * {m} = {product}. {value} + {product} = {new}.")
        elif op == "give":
            x = rng.randint(1, value)
            new = value - x
            sentences.append(f"{then} gives {x} {item} to {friend}.")
            steps.append(f"{value} - {x} = {new}.")
        elif op == "find":
            x = rng.randint(1, 30)
            new = value + x
            sentences.append(f"{then} finds {x} more {item}.")
            steps.append(f"{value} + {x} = {new}.")
        elif op == "double":
            new = value * 2
            sentences.append(f"{then} doubles the number of {item}.")
            steps.append(f"{value} * 2 = {new}.")
        else:  # share equally, keep one share
            d = rng.choice(divisors)
            new = value // d
            sentences.append(
                f"{then} shares the {item} equally among {d} people, {name} included, and keeps one share."
            )
            steps.append(f"{value} / {d} = {new}.")
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(question=" ".join(sentences), solution=" ".join(steps), answer=str(value))


def is_heldout_text(text: str, heldout_percent: int = 10) -> bool:
    """Deterministic split by a hash of ``text`` (a problem's question, or a file's relative path)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 100 < heldout_percent


def generate_split(num_train: int, num_heldout: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """``num_train`` training and ``num_heldout`` distinct held-out problems; no question is in both."""
    rng = random.Random(seed)
    train: list[Problem] = []
    heldout: dict[str, Problem] = {}
    while len(train) < num_train or len(heldout) < num_heldout:
        problem = make_problem(rng)
        if is_heldout_text(problem.question):
            if len(heldout) < num_heldout:
                heldout.setdefault(problem.question, problem)
        elif len(train) < num_train:
            train.append(problem)
    return train, list(heldout.values())


def extract_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text`` (commas removed), or ``None`` when there is none."""
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    number = match.group(1).replace(",", "")
    return number if re.fullmatch(r"-?\d+", number) else None


def exact_match_accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of ``completions`` whose extracted answer equals the gold ``answers`` (as integers)."""
    if len(completions) != len(answers):
        raise ValueError(f"completions ({len(completions)}) and answers ({len(answers)}) differ in length")
    if not answers:
        raise ValueError("answers is empty; expected at least one problem")
    correct = 0
    for completion, gold in zip(completions, answers):
        predicted = extract_answer(completion)
        correct += predicted is not None and int(predicted) == int(gold)
    return correct / len(answers)


__all__ = ["Problem", "exact_match_accuracy", "extract_answer", "generate_split", "is_heldout_text", "make_problem"]
