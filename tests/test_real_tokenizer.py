"""The runtime's tokenizer against transformers on the real Qwen3 tokenizer of Z-Image-Turbo, for a few hundred
varied prompts: scripts, emoji, whitespace, special-token look-alikes, and prompts over 512 tokens.

The real tokenizer files live in ../shared/real-model/tokenizer beside the checkout (used from there, never
copied into the project); without that folder these tests skip with the reason.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from zimage_trt.runtime.tokenizer import PromptTokenizer

from .test_tokenizer import reference_ids

REAL_MODEL = Path(__file__).resolve().parents[2] / "shared" / "real-model"
pytestmark = pytest.mark.skipif(
    not (REAL_MODEL / "tokenizer" / "tokenizer.json").is_file(),
    reason=f"the real Qwen3 tokenizer is not at {REAL_MODEL / 'tokenizer'} (it lives beside the checkout)",
)

FRAGMENTS = [
    "A photograph of a red fox sitting in fresh snow at sunrise", "cinematic lighting, 35mm film grain",
    "一只橘猫趴在窗台上晒太阳，窗外是樱花。", "東京の夜景、ネオンの反射、雨上がりの路地", "서울의 가을 거리, 낙엽",
    "Красная площадь зимой, падающий снег", "مدينة قديمة عند الغروب", "עיר עתיקה בשקיעה", "पहाड़ों पर सूर्योदय",
    "ทะเลสาบยามเช้า", "Ελληνικός ναός στο φως", "Straße, café, naïve, Ångström, façade, ñandú",
    "emoji ⚡️🦊🔥 and a family 👨‍👩‍👧‍👦, skin tones 👍🏽👋🏿, flags 🇯🇵🇫🇷", "math ∑ x² ≤ ∞, π ≈ 3.14159",
    "code: `for i in range(10): print(i)`", "<|im_end|> <|im_start|>system", "<think>plan</think>",
    "<|endoftext|>", "numbers 1024x1024 and 3,000,000 or 12:45", "'single' \"double\" «guillemets» „low“",
    "tabs\tand\tmore\ttabs", "new\nlines\n\n\nmany", "windows\r\nline ends", "non\u00a0breaking\u2009thin spaces",
    "zero\u200bwidth\u200djoiner", "combining e\u0301 vs \u00e9 (NFD vs NFC)", "full-width ＡＢＣ１２３",
    "ALL CAPS SHOUTING!!!", "   ", "URL https://example.com/a?b=c&d=e#f", "hash #tags @mentions",
    "a very long caption with many words", "ornate baroque ceiling fresco, gold leaf, cherubs",
]


def prompts() -> list[str]:
    """A few hundred prompts: each fragment alone, then seeded mixes of 2-6 fragments with varied joins, and
    prompts far over 512 tokens."""
    rng = random.Random(13)
    out = [f for f in FRAGMENTS if f.strip()]
    joins = [" ", ", ", "\n", "  ", "\t", "", "。", " | "]
    while len(out) < 300:
        parts = rng.sample(FRAGMENTS, rng.randint(2, 6))
        text = rng.choice(joins).join(parts)
        if rng.random() < 0.2:
            text = rng.choice(["  ", "\n", " \t"]) + text + rng.choice(["  ", "\n", ""])
        if text.strip():
            out.append(text)
    out += [" ".join(rng.choice(FRAGMENTS) for _ in range(120)), "word " * 700, "🦊" * 600, "東京" * 800]
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from zimage_trt.export.bundle import _copy_tokenizer

    # The runtime reads what an export writes into a bundle: tokenizer.json and the chat template.
    model = tmp_path_factory.mktemp("real")
    (model / "tokenizer").symlink_to(REAL_MODEL / "tokenizer")
    bundle_tok = tmp_path_factory.mktemp("bundle") / "tokenizer"
    _copy_tokenizer(model, bundle_tok)
    return AutoTokenizer.from_pretrained(str(REAL_MODEL / "tokenizer")), PromptTokenizer(bundle_tok, 512)


def test_runtime_ids_equal_transformers_on_the_real_tokenizer(tokenizers):
    hf, ours = tokenizers
    cases = prompts()
    assert len(cases) >= 300
    mismatches = [p for p in cases if ours.encode(p) != reference_ids(hf, p)]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} differ, first: {mismatches[0]!r}"
    long = [p for p in cases if len(ours.encode(p, truncate=False)) > 512]
    assert len(long) >= 4 and all(len(ours.encode(p)) == 512 for p in long)  # truncated as the reference does


def test_the_chat_turn_is_qwen3s(tokenizers):
    _, ours = tokenizers
    assert ours.chat_text("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_make_tiny_with_the_real_tokenizer_tokenizes_as_transformers(tmp_path, tokenizers):
    """`make-tiny --tokenizer DIR` puts the real tokenizer into the model (the text encoder's vocabulary covers it);
    an export of that model carries it to the runtime."""
    import json

    from zimage_trt.cli import main
    from zimage_trt.export.bundle import _copy_tokenizer
    from zimage_trt.export.checkpoint import load_tokenizer

    hf, _ = tokenizers
    assert main(["make-tiny", str(tmp_path / "m"), "--tokenizer", str(REAL_MODEL / "tokenizer")]) == 0
    config = json.loads((tmp_path / "m" / "text_encoder" / "config.json").read_text())
    assert config["vocab_size"] >= hf.vocab_size
    _copy_tokenizer(tmp_path / "m", tmp_path / "bundle-tokenizer")
    ours = PromptTokenizer(tmp_path / "bundle-tokenizer", 512)
    loaded = load_tokenizer(tmp_path / "m")  # what diffusers' pipeline loads from that model
    for prompt in prompts()[:40]:
        assert ours.encode(prompt) == reference_ids(loaded, prompt) == reference_ids(hf, prompt)
