"""A tech-assistant conversation for a base code model: a preamble, a few example exchanges, then the chat.

Base StarCoder models were never tuned to chat; like StarCoder's own tech-assistant prompt, this one shows the
model what the conversation looks like and lets it continue as the assistant, stopping where the person's
next turn would begin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import StarCoderError

PREAMBLE = (
    "Below are conversations between a person and a technical assistant. The assistant knows programming well. "
    "It answers with working code and short, accurate explanations, asks when a request is unclear, says so when "
    "it does not know something, and never makes up functions, options or facts."
)

EXAMPLES = [
    ("How do I reverse a list in Python?",
     "Slicing returns a reversed copy:\n\n```python\nitems = [1, 2, 3]\nprint(items[::-1])  # [3, 2, 1]\n```\n\n"
     "To reverse the list in place instead, call `items.reverse()`."),
    ("What does `git stash` do?",
     "It saves your uncommitted changes and gives you back a clean working tree, so that you can switch branches "
     "or pull. `git stash pop` brings the changes back."),
    ("Write a JavaScript function that tells whether a string is a palindrome.",
     "```javascript\nfunction isPalindrome(text) {\n  const letters = text.toLowerCase().replace(/[^a-z0-9]/g, \"\");\n"
     "  return letters === [...letters].reverse().join(\"\");\n}\n```\n\nIt ignores case, spaces and punctuation, "
     "so `isPalindrome(\"A man, a plan, a canal: Panama\")` returns `true`."),
]

SEPARATOR = "\n\n-----\n\n"
USER, ASSISTANT = "Human:", "Assistant:"
# Where the assistant's turn is over: the person's next turn, or the next conversation.
STOP = ("\nHuman:", "\n-----")
ROLES = ("system", "user", "assistant")


def with_chat_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """The caller's stop strings, then the chat's own (where the assistant's turn is over)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return stop + tuple(s for s in STOP if s not in stop)


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt for the assistant's next reply. A system message replaces the preamble."""
    if not messages:
        raise StarCoderError("a chat needs at least one message")
    preamble = PREAMBLE
    turns: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise StarCoderError(f"message {i}: role must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise StarCoderError(f"message {i}: content must be a string")
        if message["role"] == "system":
            preamble = content
        else:
            speaker = USER if message["role"] == "user" else ASSISTANT
            turns.append(f"{speaker} {content.strip()}")
    if not turns or not turns[-1].startswith(USER):
        raise StarCoderError("the last message of a chat must be the user's")
    examples = [f"{USER} {q}\n\n{ASSISTANT} {a}" for q, a in EXAMPLES]
    conversation = "\n\n".join([*turns, ASSISTANT])
    return SEPARATOR.join([preamble, *examples, conversation])
