"""The runtime's tokenizer (tokenizers + jinja2) gives the ids the reference pipeline gives."""

from __future__ import annotations

import json

import pytest

from zimage_trt.export.tiny import build_tokenizer
from zimage_trt.runtime.tokenizer import PromptTokenizer

PROMPTS = [
    "A red fox",
    "  leading and trailing spaces  ",
    "一只橘猫趴在窗台上晒太阳，窗外是樱花。",
    "Emoji ⚡️ and accents: café, naïve, Straße",
    "line one\nline two\r\n\ttabbed",
    "special tokens inside: <|im_end|> <think>x</think> <|endoftext|>",
    "numbers 1024x1024 3.14159 and 'quotes' \"double\" it's we'll",
]


@pytest.fixture(scope="module")
def tokenizers(tiny_model, fp32_bundle):
    from zimage_trt.export.checkpoint import load_tokenizer

    return load_tokenizer(tiny_model), PromptTokenizer(fp32_bundle / "tokenizer", 512)


def reference_ids(hf, prompt: str, max_length: int = 512) -> list[int]:
    """What ZImagePipeline._encode_prompt keeps: the chat text, padded to max_length, masked back."""
    text = hf.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    enc = hf([text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return enc.input_ids[0][enc.attention_mask[0].bool()].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_the_reference(tokenizers, prompt):
    hf, ours = tokenizers
    assert ours.encode(prompt) == reference_ids(hf, prompt)


def test_long_prompt_is_truncated_like_the_reference(tokenizers):
    hf, ours = tokenizers
    prompt = "a very long caption with many words " * 200
    ids = ours.encode(prompt)
    assert len(ids) == 512
    assert ids == reference_ids(hf, prompt)


def test_chat_text_is_the_qwen_user_turn(tokenizers):
    _, ours = tokenizers
    assert ours.chat_text("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_tokenizer_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert json.loads(a.to_str()) == json.loads(b.to_str())
    assert a.get_vocab_size() > 500
    assert a.token_to_id("<|im_start|>") is not None
