"""Supervised fine-tuning examples: recognise the data's layout, split it into prompt and answer text, and
tokenize both, optionally through the tokenizer's chat template.

Layouts (found from the columns of the first file, so users do not configure them):

- ``alpaca``: ``instruction``, optional ``input``, ``output`` (alpaca_en_demo.json and its many clones);
- ``qa``: ``question``, ``answer`` (gsm8k-style jsonl);
- ``messages``: a ``messages`` list of ``{role, content}``; the last turn must be the assistant's answer and
  every turn before it is the prompt.

With the ``plain`` template the prompt is the text fields joined by a blank line, then a blank line; with
``chat`` the conversation is rendered by ``tokenizer.apply_chat_template`` and the answer is whatever the full
rendering adds after the rendering of the prompt with ``add_generation_prompt=True`` (end-of-turn tokens
included), so prompt masks follow the template exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dlm.data_streams.split import text_hash
from dlm.data_streams.tokenizer import TokenizerInfo, encode_texts
from dlm.errors import DataError

SFT_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # layout: (required columns, optional columns)
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "qa": (("question", "answer"), ()),
}


@dataclass(frozen=True)
class SftExample:
    """One example before tokenization: plain prompt/answer text, or a conversation."""

    prompt: str = ""
    answer: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    def split_hash(self) -> int:
        """The held-out split key: the example's content, independent of the template."""
        if self.messages:
            return text_hash(json.dumps(self.messages))
        return text_hash(self.prompt + "\x1f" + self.answer)


def detect_layout(columns: Sequence[str], where: str) -> tuple[str, list[str]]:
    """The layout of an SFT file from its columns, and the columns to read."""
    for layout, (required, optional) in SFT_LAYOUTS.items():
        if all(c in columns for c in required):
            return layout, [*required, *(c for c in optional if c in columns)]
    wanted = "; ".join(" + ".join(req) for req, _ in SFT_LAYOUTS.values())
    raise DataError(
        f"{where} has columns {', '.join(columns) or 'none'}, none of the SFT layouts ({wanted}); rename the "
        "columns, or use data.format=pretrain-packed or rows for plain text"
    )


def _field(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} holds {type(value).__name__}, not text; fix the SFT file")
    return value


def example_of_row(row: dict[str, Any], layout: str, where: str) -> SftExample | None:
    """The example in one row, or None when its prompt or answer is blank (skipped and counted)."""
    if layout == "messages":
        turns = row.get("messages") or []
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or "role" not in turn:
                raise DataError(f"{where}: each message must be a {{role, content}} object with text content")
            messages.append((str(turn["role"]), turn["content"]))
        if len(messages) < 2 or not messages[-1][1].strip():
            return None
        if messages[-1][0] != "assistant":
            raise DataError(
                f"{where}: the last message has role {messages[-1][0]!r}; SFT needs the assistant's answer last"
            )
        return SftExample(messages=tuple(messages))
    if layout == "alpaca":
        parts = [_field(row, "instruction", where), _field(row, "input", where)]
        answer = _field(row, "output", where)
    else:
        parts = [_field(row, "question", where)]
        answer = _field(row, "answer", where)
    prompt = "\n\n".join(p.strip() for p in parts if p.strip())
    if not prompt or not answer.strip():
        return None
    return SftExample(prompt=prompt, answer=answer)


def _conversation(example: SftExample) -> list[dict[str, str]]:
    if example.messages:
        return [{"role": role, "content": content} for role, content in example.messages]
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]


def _chat_texts(tokenizer: TokenizerInfo, example: SftExample) -> tuple[str, str]:
    tok = tokenizer.tokenizer
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"tokenizer {tokenizer.name} has no chat template; set data.sft_template=plain or use a tokenizer "
            "whose tokenizer_config.json defines chat_template"
        )
    conversation = _conversation(example)
    prompt = str(tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True))
    full = str(tok.apply_chat_template(conversation, tokenize=False))
    if not full.startswith(prompt):
        raise DataError(
            f"tokenizer {tokenizer.name}'s chat template renders the prompt differently inside the full "
            "conversation, so the answer cannot be split off; set data.sft_template=plain or fix the template"
        )
    return prompt, full[len(prompt) :]


def _plain_texts(example: SftExample) -> tuple[str, str]:
    if example.messages:
        turns = [content.strip() for _, content in example.messages[:-1] if content.strip()]
        return "\n\n".join(turns) + "\n\n", example.messages[-1][1]
    return example.prompt + "\n\n", example.answer


def encode_examples(
    tokenizer: TokenizerInfo, examples: Sequence[SftExample], template: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt ids, answer ids) per example; the EOS padding is added later, by the row format."""
    if template == "chat":
        texts = [_chat_texts(tokenizer, e) for e in examples]
    else:
        texts = [_plain_texts(e) for e in examples]
    prompts = encode_texts(tokenizer, [p for p, _ in texts])
    answers = encode_texts(tokenizer, [a for _, a in texts])
    return list(zip(prompts, answers))
