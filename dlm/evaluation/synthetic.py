"""A synthetic prompt → answer task with exactly checkable answers whose lengths vary widely, skewed short.

Why it exists: the length benchmark's "quality kept" figure needs a task on which a tiny model, trained on a
CPU in minutes, reaches a measurable exact-match accuracy, and whose answer lengths look like real ones (most
short, a long right tail), so that predicted budgets have something to save. Real instruction data has the
length profile but no exact checker; this task has both.

Four kinds of question, each stating the number that fixes the answer's length, so a length head can read it
off the prompt:

- ``Repeat the word cat 7 times.`` → ``cat cat cat cat cat cat cat``
- ``Count from 12 to 17.`` → ``12 13 14 15 16 17``
- ``Reverse these 5 digits: 3 1 4 1 5`` → ``5 1 4 1 3``
- ``Sort these 5 digits: 3 1 4 1 5`` → ``1 1 3 4 5``

Every answer item is one GPT-2 token (the words below, the digits, and the numbers 0 … 300, with or without a
leading space), so an answer of ``n`` items is exactly ``n`` tokens under the bundled ``gpt2-mdm`` tokenizer.
``n`` is drawn log-uniformly from ``[2, max_answer_tokens]``: the median is about ``sqrt(2 · max)`` (22 for the
default 250), far below the maximum, like real answers. The vocabulary stays small (eight words, digits,
numbers to 300, a dozen template words), which is what lets a tiny model learn the task quickly.

The checker does not trust a stored answer: :func:`solve` recomputes the reference from the question text,
and :func:`check` compares after collapsing whitespace.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlm.errors import DataError

WORDS: tuple[str, ...] = ("cat", "dog", "sun", "red", "blue", "star", "tree", "fish")
TASKS: tuple[str, ...] = ("repeat", "count", "reverse", "sort")
MIN_ANSWER_TOKENS = 2
DEFAULT_MAX_ANSWER_TOKENS = 250
MAX_NUMBER = 300
"""Largest number ``count`` uses: every integer 0 … 361 is one GPT-2 token with and without a leading space."""
_LIMIT = 4096  # longest answer the generator makes; a model canvas is rarely longer

_REPEAT = re.compile(r"^Repeat the word ([a-z]+) (\d+) times\.$")
_COUNT = re.compile(r"^Count from (\d+) to (\d+)\.$")
_DIGITS = re.compile(r"^(Reverse|Sort) these (\d+) digits: ([0-9 ]+)$")


@dataclass(frozen=True)
class Example:
    """One question and its reference answer, with the task kind and the item count (= answer tokens)."""

    task: str
    question: str
    answer: str
    items: int

    def row(self) -> dict[str, str]:
        """The gsm8k-style JSON Lines row (``question``/``answer``) the SFT reader and ``dlm eval`` read."""
        return {"question": self.question, "answer": self.answer}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def solve(question: str) -> str:
    """The reference answer of a synthetic question, recomputed from its text.

    A question that is not one of the four forms is a :class:`~dlm.errors.DataError`: the checker must never
    silently score a foreign data set.
    """
    text = _normalise(question)
    if m := _REPEAT.match(text):
        return " ".join([m.group(1)] * int(m.group(2)))
    if m := _COUNT.match(text):
        a, b = int(m.group(1)), int(m.group(2))
        return " ".join(str(i) for i in range(a, b + 1))
    if m := _DIGITS.match(text):
        digits = m.group(3).split()
        if len(digits) != int(m.group(2)):
            raise DataError(f"synthetic question says {m.group(2)} digits but lists {len(digits)}: {question[:80]!r}")
        return " ".join(reversed(digits) if m.group(1) == "Reverse" else sorted(digits))
    raise DataError(
        f"not a synthetic-task question: {question[:80]!r}; the checker only scores data written by "
        "`dlm data synthetic`"
    )


def is_synthetic(question: str) -> bool:
    """Whether ``question`` is one of the synthetic task's forms (so its answers can be checked exactly)."""
    text = _normalise(question)
    return bool(_REPEAT.match(text) or _COUNT.match(text) or _DIGITS.match(text))


def check(question: str, generated_answer: str) -> bool:
    """Exact match of ``generated_answer`` with the question's reference answer, ignoring whitespace layout."""
    return _normalise(generated_answer) == solve(question)


def _repeat(rng: random.Random, n: int) -> Example:
    word = rng.choice(WORDS)
    return Example("repeat", f"Repeat the word {word} {n} times.", " ".join([word] * n), n)


def _count(rng: random.Random, n: int) -> Example:
    a = rng.randint(0, MAX_NUMBER + 1 - n)
    b = a + n - 1
    return Example("count", f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1)), n)


def _digits(kind: str) -> Callable[[random.Random, int], Example]:
    def make(rng: random.Random, n: int) -> Example:
        digits = [str(rng.randrange(10)) for _ in range(n)]
        verb = "Reverse" if kind == "reverse" else "Sort"
        answer = reversed(digits) if kind == "reverse" else sorted(digits)
        return Example(kind, f"{verb} these {n} digits: {' '.join(digits)}", " ".join(answer), n)

    return make


_MAKERS: dict[str, Callable[[random.Random, int], Example]] = {
    "repeat": _repeat,
    "count": _count,
    "reverse": _digits("reverse"),
    "sort": _digits("sort"),
}


def _check_args(n: int, max_answer_tokens: int, tasks: Sequence[str]) -> None:
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    if not MIN_ANSWER_TOKENS <= max_answer_tokens <= _LIMIT:
        problems.append(f"max_answer_tokens must be in [{MIN_ANSWER_TOKENS}, {_LIMIT}], got {max_answer_tokens}")
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown or not tasks:
        problems.append(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {', '.join(tasks) or 'none'}")
    if list(tasks) == ["count"] and max_answer_tokens > MAX_NUMBER + 1:
        problems.append(f"count alone cannot make answers longer than {MAX_NUMBER + 1} tokens; add another task "
                        "or lower max_answer_tokens")
    if problems:
        raise DataError("synthetic task: " + "; ".join(problems))


def iter_examples(
    n: int, seed: int = 0, max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS, tasks: Sequence[str] = TASKS
) -> Iterator[Example]:
    """``n`` examples, a pure function of the arguments (one ``random.Random(seed)`` drives everything).

    The answer length ``n_items`` is log-uniform on ``[2, max_answer_tokens]`` (``floor(exp(U(ln 2,
    ln(max + 1))))``), then the task is drawn uniformly among those that can make that length (``count`` stops
    at 301 items).
    """
    _check_args(n, max_answer_tokens, tasks)
    rng = random.Random(seed)
    low, high = math.log(MIN_ANSWER_TOKENS), math.log(max_answer_tokens + 1)
    for _ in range(n):
        items = min(max_answer_tokens, max(MIN_ANSWER_TOKENS, int(math.exp(rng.uniform(low, high)))))
        usable = [t for t in tasks if t != "count" or items <= MAX_NUMBER + 1]
        yield _MAKERS[rng.choice(usable)](rng, items)


def questions_in(paths: Sequence[str | Path]) -> set[str]:
    """The questions of synthetic JSON Lines files (whitespace-normalised), to keep a test set apart from them."""
    found: set[str] = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path} does not exist; --exclude takes files written by `dlm data synthetic`")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    found.add(_normalise(json.loads(line)["question"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise DataError(f"{path}:{number} is not a question/answer JSON line ({exc})") from exc
    return found


def _unseen(n: int, seed: int, max_answer_tokens: int, tasks: Sequence[str], exclude: set[str]) -> list[Example]:
    """``n`` examples whose questions are not in ``exclude`` (nor repeated), drawn from one seeded stream.

    Short questions are few (8 words × a handful of counts), so a test set drawn with another seed would
    repeat many training questions; skipping them keeps exact-match accuracy a measure of the model, not of
    memory. Gives up, naming the fix, when the stream runs dry.
    """
    examples: list[Example] = []
    seen = set(exclude)
    for example in iter_examples(200 * n, seed, max_answer_tokens, tasks):
        if example.question not in seen:
            seen.add(example.question)
            examples.append(example)
            if len(examples) == n:
                return examples
    raise DataError(f"only {len(examples)} of {n} new questions after {200 * n} draws; ask for fewer, raise "
                    "--max-answer-tokens or exclude less")


def write_jsonl(
    path: str | Path,
    n: int,
    seed: int = 0,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    tasks: Sequence[str] = TASKS,
    exclude: Sequence[str | Path] = (),
) -> list[Example]:
    """Write ``n`` examples to ``path`` as ``{"question", "answer"}`` JSON Lines (parents created).

    With ``exclude`` (files of this task, e.g. the training set), every question is new: in none of those files
    and not repeated within this one.
    """
    if exclude:
        examples = _unseen(n, seed, max_answer_tokens, tasks, questions_in(exclude))
    else:
        examples = list(iter_examples(n, seed, max_answer_tokens, tasks))
    out = Path(path)
    if out.is_dir():
        raise DataError(f"{out} is a directory; give a file name such as {out / 'synthetic.jsonl'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for example in examples:
            fh.write(json.dumps(example.row()) + "\n")
    return examples
