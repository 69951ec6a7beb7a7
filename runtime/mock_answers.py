"""What the mock LLM says: deterministic answers, word-count usage and lexical embeddings.

Everything here is a pure function of its input, so tests and benchmarks can predict it:
the answer to a message is always the same sequence of word tokens, and the embedding of
a text is a hashed bag of its lowercased words, of any script (signed feature hashing,
L2-normalised).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z0-9']+")
_ANY_SCRIPT_WORD = re.compile(r"[\w']+")  # embeddings read words of every script
_HOOK = re.compile(r"#(tokens=\d+|fail|slow|echo)\b")
_TOKENS_HOOK = re.compile(r"#tokens=(\d+)")
_ECHO_WORDS = 6
MAX_ANSWER_TOKENS = 100_000

_VOCAB = (
    "agent", "answer", "billing", "bucket", "catalog", "chat", "context", "customer",
    "deploy", "document", "embed", "flow", "gateway", "greeting", "invoice", "key",
    "limit", "market", "message", "model", "origin", "plan", "prompt", "provider",
    "quota", "registry", "request", "runtime", "seller", "session", "stream", "subscription",
    "support", "tenant", "token", "usage", "vector", "widget", "window", "workflow",
)


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """How the mock answers one chat request: its words and the test hooks it carries."""

    words: tuple[str, ...]
    fail: bool
    slow: bool

    def tokens(self) -> list[str]:
        """The streamed pieces; their concatenation is the full answer text."""
        return [word if i == 0 else " " + word for i, word in enumerate(self.words)]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def count_words(text: str) -> int:
    """The mock's token count: whitespace-separated words."""
    return len(text.split())


def plan_answer(last_user_message: str, default_tokens: int) -> AnswerPlan:
    """An echo of the message's last words, padded with words drawn from a seeded generator."""
    length = default_tokens
    match = _TOKENS_HOOK.search(last_user_message)
    if match:
        length = min(int(match.group(1)), MAX_ANSWER_TOKENS)
    clean = _HOOK.sub(" ", last_user_message)
    if "#echo" in last_user_message:
        # The whole message back, word by word: shows a test the prompt a flow built.
        whole = tuple(clean.split()[:MAX_ANSWER_TOKENS]) or ("You", "said", "nothing")
        return AnswerPlan(words=whole, fail=False, slow="#slow" in last_user_message)
    echo = _WORD.findall(clean)[-_ECHO_WORDS:]
    head = ["You", "asked", "about", *echo] if echo else ["You", "said", "nothing"]
    seed = int.from_bytes(hashlib.blake2b(clean.encode(), digest_size=8).digest(), "big")
    rng = random.Random(seed)
    words = head[:length]
    while len(words) < length:
        words.append(rng.choice(_VOCAB))
    if words:
        words[-1] += "."
    return AnswerPlan(
        words=tuple(words), fail="#fail" in last_user_message, slow="#slow" in last_user_message
    )


def embed(text: str, dimensions: int) -> list[float]:
    """Signed feature hashing of lowercased words, L2-normalised; all zeros for no words."""
    vector = [0.0] * dimensions
    for word in _ANY_SCRIPT_WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:7], "big") % dimensions
        vector[bucket] += 1.0 if digest[7] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        return vector
    return [v / norm for v in vector]
