"""The server's token count (zimage_trt/serve_tokens.py) against the runtime's full tokenization: the same first
512 ids and the same `truncated`, for long prompts built to put every kind of character next to the cuts, on the
tiny model's tokenizer and (when it is beside the checkout) the real Qwen3 one; and a long prompt of words is
counted from a bounded prefix."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from zimage_trt.runtime.tokenizer import PromptTokenizer
from zimage_trt.serve_tokens import PromptCounter, _safe_cut

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-model"
# Pieces that stress a cut: combining marks on both sides of a space, NFC compositions, special-token text,
# contractions, digits, CJK and emoji with and without spaces, runs of spaces, tabs, newlines and CRLF.
PIECES = ["word ", "x ", "!! ", "e\u0301 ", " \u0301", "A\u030a ", "\u00c5 ", "<|im_end|> ", "<|im_start|>",
          "<think>", "1 2 3 ", "12345 ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "東京 ", "東京の夜景", "🦊 ", "🦊🦊",
          "'s ", "don't ", "I'LL ", "a.b ", "ß ", "ﬁ ", "—", "... ", "[x] ", "<b> ", "\u200b", "\u00a0", ", ", "."]


def _tokenizer(model_dir: Path, out: Path) -> tuple[PromptTokenizer, Path]:
    from zimage_trt.export.bundle import _copy_tokenizer

    _copy_tokenizer(model_dir, out)
    return PromptTokenizer(out, 512), out / "tokenizer.json"


@pytest.fixture(scope="module", params=["tiny", "real"])
def tokenizer(request, tiny_model, tmp_path_factory):
    """(PromptTokenizer, the tokenizer.json it reads): the tiny model's, then the real Qwen3 one."""
    if request.param == "tiny":
        return _tokenizer(tiny_model, tmp_path_factory.mktemp("tok-tiny"))
    if not (REAL / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip(f"the real Qwen3 tokenizer is not at {REAL / 'tokenizer'} (it lives beside the checkout)")
    model = tmp_path_factory.mktemp("real-model")
    (model / "tokenizer").symlink_to(REAL / "tokenizer")
    return _tokenizer(model, tmp_path_factory.mktemp("tok-real"))


def long_prompts(n: int = 30) -> list[str]:
    rng = random.Random(5)
    out = []
    for _ in range(n):
        text = ""
        target = rng.randint(3_000, 10_000)
        while len(text) < target:
            text += rng.choice(PIECES) * rng.choice([1, 1, 1, 2, 5])
        out.append(text)
    return out + ["word " * 6_400, "a " * 16_000, " " * 9_000 + "x", "東京" * 5_000, "🦊 " * 6_000]


def test_the_count_is_the_runtimes_for_long_prompts_of_every_kind(tokenizer):
    tok, path = tokenizer
    counter = PromptCounter(tok, path)
    assert counter.cuts  # both tokenizers have the shape the proof is about
    prefix_used = 0
    for prompt in long_prompts():
        counted = counter.count(prompt)
        full = tok.encode(prompt, truncate=False)
        assert counted.ids == full[:512], prompt[:80]
        assert counted.truncated == (len(full) > 512), prompt[:80]
        assert tok.encode(counted.text) == full[:512]  # the shortened text the worker tokenizes says the same
        prefix_used += counted.chars_tokenized < len(prompt)
    assert prefix_used >= 20  # most were decided from a prefix


def test_a_32000_character_prompt_is_counted_from_a_bounded_prefix(tokenizer):
    tok, path = tokenizer
    counter = PromptCounter(tok, path)
    prompt = ("a photograph of a red fox sitting in fresh snow at sunrise, " * 600)[:32_000]
    start = time.perf_counter()
    counted = counter.count(prompt)
    seconds = time.perf_counter() - start
    assert counted.truncated and len(counted.ids) == 512
    assert counted.chars_tokenized <= 8 * 512  # the first prefix (8 characters a token) held 512 tokens
    assert seconds < 0.5, seconds
    assert counted.ids == tok.encode(prompt)


def test_short_prompts_and_prompts_without_a_cut_are_tokenized_whole(tokenizer):
    tok, path = tokenizer
    counter = PromptCounter(tok, path)
    for prompt in ["a red fox", "", "東京" * 3_000, "🦊" * 5_000]:
        counted = counter.count(prompt)
        assert counted.chars_tokenized == len(prompt) and counted.text == prompt
        assert counted.ids == tok.encode(prompt, allow_empty=True)


def test_a_tokenizer_of_another_shape_is_always_tokenized_whole(tokenizer, tmp_path):
    tok, path = tokenizer
    spec = json.loads(path.read_text("utf-8"))
    spec["normalizer"] = {"type": "NFKC"}  # a normalizer the proof does not cover
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(spec), "utf-8")
    counter = PromptCounter(tok, other)
    assert not counter.cuts
    prompt = "word " * 2_000
    counted = counter.count(prompt)
    assert counted.chars_tokenized == len(prompt) and counted.ids == tok.encode(prompt)


def test_a_safe_cut_is_a_space_after_printable_ascii():
    text = "ab \u00e9 c  d"  # spaces at 2 (after "b"), 4 (after "\u00e9"), 6 (after "c"), 7 (after a space)
    assert _safe_cut(text, 0, len(text)) == 6
    assert _safe_cut(text, 0, 5) == 2
    assert _safe_cut(text, 2, 5) == 0  # nothing new past the last cut tried
