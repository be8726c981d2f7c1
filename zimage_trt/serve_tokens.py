"""The first max_length tokens of a long prompt, and whether it is truncated, without tokenizing all of it.

The model reads the first 512 tokens of the chat-formatted prompt (runtime/tokenizer.py truncates as the reference
does). A 32,000-character prompt of words has ~6,600 tokens, and its first 512 are decided by its first ~2,500
characters. So the prompt is tokenized up to a *safe cut*: a place where the tokenizer provably splits the same
way whatever follows. The prefix doubles until its tokens reach max_length (the prompt is then truncated, and its
first max_length tokens are known) or it is the whole prompt.

A safe cut is a position K with text[K] == " " and text[K-1] printable ASCII other than the space. For the
tokenizer of Qwen2/Qwen3 (checked from the bundle's tokenizer.json: added tokens, NFC, the Split regex below,
byte-level BPE) the tokens before K are the same in chat(text) and in chat(text[:K]):
- added tokens (<|im_end|>, ...) are matched first: none contains a space, so none spans K in chat(text); in
  chat(text[:K]) the template's tail follows K and starts with an added token (checked) that no added token
  overlaps from the left (checked: no added token has the tail's first character past its own first);
- NFC: text[K-1] and text[K] are ASCII, which never compose with a neighbour nor are reordered, so
  NFC(text) = NFC(text[:K]) + NFC(text[K:]) and NFC(text[:K]) ends with text[K-1];
- the Split regex matches left to right: a match starting before K reaches K only through text[K-1], a non-space,
  and would need a letter, a digit, punctuation or a newline at K; a space there and the end of the piece both
  stop it, so every match before K is the same;
- BPE (and the byte-level mapping) runs on each pre-token alone.
The space at K adds at least one token, so when those before K number max_length the prompt is truncated.
A tokenizer of another shape, or a prompt with no safe cut (e.g. a run of CJK or emoji with no space), is tokenized
whole; the server bounds that by --max-prompt-chars before calling this.

Tokenizing uses `encode_batch`, which releases the GIL, so the event loop can run it in a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer pattern (also export/tiny.py's): the only Split pattern the proof above is about.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SENTINEL = "zimage-sentinel-7f3a"  # a prompt whose rendering splits the chat template into head and tail
FIRST_CUT_PER_TOKEN = 8  # the first prefix: 8 characters per token (words average ~5 a token)


@dataclass
class Counted:
    ids: list[int]  # the first max_length token ids of the chat-formatted text
    truncated: bool  # the text has more tokens than max_length
    text: str  # a prefix of the text with the same first max_length tokens (the whole text if not truncated)
    chars_tokenized: int  # how much of the text was tokenized (the proof that not all of it was)


def _structure_allows_cuts(tokenizer_json: Path, tail: str) -> bool:
    """True when the tokenizer is of the shape the module docstring reasons about."""
    spec = json.loads(tokenizer_json.read_text("utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    shape_ok = (
        (spec.get("normalizer") or {"type": "NFC"}).get("type") == "NFC"
        and steps is not None and len(steps) == 2
        and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": QWEN_SPLIT}
        and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
        and spec.get("model", {}).get("type") == "BPE" and spec["model"].get("dropout") is None
        and (spec.get("post_processor") or {"type": "ByteLevel"}).get("type") == "ByteLevel"
    )
    added = [t["content"] for t in spec.get("added_tokens", [])]
    tail_ok = bool(tail) and any(tail.startswith(c) for c in added) and not any(tail[0] in c[1:] for c in added)
    return shape_ok and tail_ok and not any(" " in c for c in added)


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The largest K in (lo, hi] with text[K] == " " and text[K-1] printable ASCII but not a space; 0 if none."""
    k = text.rfind(" ", lo + 1, hi + 1)
    while k > lo:
        if "!" <= text[k - 1] <= "~":
            return k
        k = text.rfind(" ", lo + 1, k)
    return 0


class PromptCounter:
    """Counts tokens as runtime.tokenizer.PromptTokenizer.encode would, tokenizing a bounded prefix when it can."""

    def __init__(self, tok, tokenizer_json: Path):
        self.tok = tok  # runtime.tokenizer.PromptTokenizer
        self.limit = tok.max_length
        parts = tok.chat_text(SENTINEL).split(SENTINEL)
        self.head, self.tail = (parts[0], parts[1]) if len(parts) == 2 else ("", "")
        self.cuts = len(parts) == 2 and _structure_allows_cuts(Path(tokenizer_json), self.tail)

    def _encode(self, text: str):
        return self.tok.tokenizer.encode_batch([self.tok.chat_text(text)])[0]

    def _renders_verbatim(self, text: str) -> bool:
        return self.tok.chat_text(text) == self.head + text + self.tail

    def count(self, text: str) -> Counted:
        if self.cuts and self._renders_verbatim(text):
            lo, target = 0, FIRST_CUT_PER_TOKEN * self.limit
            while target < len(text):
                cut = _safe_cut(text, lo, target)
                if cut and self._renders_verbatim(text[:cut]):
                    enc = self._encode(text[:cut])
                    boundary = len(self.head) + cut  # tokens that start before it come from head + text[:cut]
                    before = sum(1 for start, _ in enc.offsets if start < boundary)
                    if before >= self.limit:
                        return Counted(enc.ids[: self.limit], True, text[:cut], cut)
                lo, target = max(lo, cut), 2 * target
        ids = self._encode(text).ids
        return Counted(ids[: self.limit], len(ids) > self.limit, text, len(text))
