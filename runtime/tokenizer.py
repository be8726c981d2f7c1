"""Prompt -> token ids, as the reference pipeline tokenizes it, without transformers.

The reference renders the chat template for one user turn (add_generation_prompt=True, enable_thinking=True),
tokenizes the text with the fast tokenizer, and truncates to 512 tokens (it then pads to 512 and keeps only
the unpadded rows, which is what running on the unpadded ids gives). Here the bundle's tokenizer.json is run
by `tokenizers` and the template by jinja2 with the settings transformers uses for chat templates.
"""

from __future__ import annotations

from pathlib import Path

from zimage_trt.common.errors import UserError


def _template_environment():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env


class PromptTokenizer:
    def __init__(self, directory: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.template = _template_environment().from_string((directory / "chat_template.jinja").read_text("utf-8"))
        self.max_length = max_length

    def chat_text(self, prompt: str) -> str:
        return self.template.render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=True
        )

    def encode(self, prompt: str, truncate: bool = True, allow_empty: bool = False) -> list[int]:
        """Token ids of the prompt in its chat turn, truncated to max_length as the reference does. An empty
        prompt is a mistake, except as the negative prompt of guidance (diffusers' default is "")."""
        if not isinstance(prompt, str):
            raise UserError(f"the prompt must be a string, not {type(prompt).__name__}")
        if not prompt.strip() and not allow_empty:
            raise UserError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. "\ud800" sent as a JSON escape
            raise UserError(
                f"the prompt is not valid Unicode text: {exc.reason} at character {exc.start}"
            ) from None
        ids = self.tokenizer.encode(self.chat_text(prompt)).ids
        return ids[: self.max_length] if truncate else ids
