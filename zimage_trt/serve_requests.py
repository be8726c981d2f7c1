"""A request body -> a validated Generation, or a 400 in the OpenAI error shape naming the field.

Every string is bounded before it is used: the prompt and negative_prompt by --max-prompt-chars (counted before
anything tokenizes them), every other string field by MAX_FIELD_CHARS. The prompt's tokens are counted by
serve_tokens (a bounded prefix of a long prompt) in a thread, off the event loop. OpenAI's image fields:
output_format png | jpeg | webp with output_compression 0..100 (the JPEG/WebP quality; PNG is lossless),
response_format b64_json only, user and moderation accepted and ignored, stream refused (not offered yet).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass

from zimage_trt.common.errors import UserError

from .serve_options import MAX_FIELD_CHARS, MAX_GUIDANCE, MAX_SEED, ApiError, too_long

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MODERATION = ("auto", "low")


@dataclass
class Generation:
    prompt: str
    n: int
    size: tuple[int, int]  # (width, height)
    steps: int
    guidance: object  # runtime.pipeline.Guidance or None
    lora: tuple  # (name, strength) or ()
    seed: int
    output_format: str = "png"
    quality: int = 100  # output_compression: JPEG/WebP quality
    ids: list[int] = dataclasses.field(default_factory=list)  # the prompt's first max_length token ids
    prompt_tokens: int = 0
    prompt_truncated: bool = False


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(body: dict, name: str, default=None):
    """A field's value, `default` when absent or null; a string over MAX_FIELD_CHARS is refused here."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        raise too_long(name, MAX_FIELD_CHARS, len(value))
    return value


def check_text(value, name: str, limit: int, allow_empty: bool = False) -> str:
    """A prompt-like field: a string of at most `limit` characters, not blank (unless allowed), valid Unicode."""
    code = f"invalid_{name}"
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string", name, code)
    if len(value) > limit:
        raise too_long(name, limit, len(value))
    if not allow_empty and not value.strip():
        raise ApiError(400, f"'{name}' is empty", name, code)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. "\ud800" sent as a JSON escape
        raise ApiError(400, f"'{name}' is not valid Unicode text: {exc.reason} at character {exc.start}",
                       name, code) from None
    return value


class RequestParser:
    """Validates against what the service serves: its sizes, steps, LoRAs and the bundle's tokenizer."""

    def __init__(self, service, opts):
        self.service, self.opts = service, opts

    def check(self, body) -> Generation:
        """Every field, cheaply (no tokenizing): a 400 for the first bad one."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.check_unsupported(body)
        prompt = check_text(body.get("prompt"), "prompt", self.opts.max_prompt_chars)
        n = body.get("n", 1)
        if not _integer(n) or not 1 <= n <= self.opts.max_n:
            raise ApiError(400, f"'n' must be an integer from 1 to {self.opts.max_n}", "n", "invalid_n")
        size = self.parse_size(_field(body, "size", "auto"))
        output_format, quality = self.parse_output(body)
        steps = body.get("num_inference_steps", self.service.runtime.default_steps)
        if not _integer(steps) or not 1 <= steps <= self.opts.max_steps:
            raise ApiError(400, f"'num_inference_steps' must be an integer from 1 to {self.opts.max_steps}",
                           "num_inference_steps", "invalid_steps")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif not _integer(seed) or not 0 <= seed <= MAX_SEED - self.opts.max_n:
            raise ApiError(400, "'seed' must be a non-negative integer", "seed", "invalid_seed")
        guidance = self.parse_guidance(body)
        lora = self.parse_lora(body)
        self.check_ignored(body)
        return Generation(prompt, n, size, steps, guidance, lora, seed, output_format, quality)

    async def tokenize(self, req: Generation) -> Generation:
        """The prompt's tokens (a bounded prefix of a long one), in a thread: tokenizers releases the GIL."""
        counted = await asyncio.to_thread(self.service.counter.count, req.prompt)
        req.ids, req.prompt_tokens, req.prompt_truncated = counted.ids, len(counted.ids), counted.truncated
        if req.guidance is not None:  # the worker tokenizes the shortest text with the same first 512 tokens
            negative = await asyncio.to_thread(self.service.counter.count, req.guidance.negative_prompt)
            req.guidance = dataclasses.replace(req.guidance, negative_prompt=negative.text)
        return req

    @staticmethod
    def check_unsupported(body: dict) -> None:
        stream, partial = body.get("stream"), body.get("partial_images")
        if stream not in (None, False):
            raise ApiError(400, "streaming ('stream': true, with 'partial_images') is not offered yet; leave 'stream' "
                           "out or send false", "stream", "unsupported_parameter")
        if partial not in (None, 0) or isinstance(partial, bool):
            raise ApiError(400, "'partial_images' needs streaming, which is not offered yet", "partial_images",
                           "unsupported_parameter")

    @staticmethod
    def check_ignored(body: dict) -> None:
        """user, moderation and model: accepted (clients send them) and ignored, if well-formed."""
        for name in ("user", "model"):
            if not isinstance(_field(body, name, ""), str):
                raise ApiError(400, f"'{name}' must be a string", name, f"invalid_{name}")
        if _field(body, "moderation", "auto") not in MODERATION:
            raise ApiError(400, "'moderation' must be 'auto' or 'low'", "moderation", "invalid_moderation")

    @staticmethod
    def parse_output(body: dict) -> tuple[str, int]:
        fmt = _field(body, "response_format", "b64_json")
        if fmt == "url":
            raise ApiError(400, "response_format 'url' needs storage to serve images from, which this server does "
                           "not have; use 'b64_json'", "response_format", "unsupported_response_format")
        if fmt != "b64_json":
            raise ApiError(400, "'response_format' must be 'b64_json'; use 'b64_json'", "response_format",
                           "unsupported_response_format")
        out = _field(body, "output_format", "png")
        if out not in OUTPUT_FORMATS:
            raise ApiError(400, "'output_format' must be one of png, jpeg, webp", "output_format",
                           "invalid_output_format")
        quality = body.get("output_compression")
        quality = 100 if quality is None else quality
        if not _integer(quality) or not 0 <= quality <= 100:
            raise ApiError(400, "'output_compression' must be an integer from 0 to 100", "output_compression",
                           "invalid_output_compression")
        if out == "png" and quality != 100:
            raise ApiError(400, "Compression less than 100 is not supported for PNG output format (PNG is lossless; "
                           "use jpeg or webp)", "output_compression", "invalid_output_compression")
        return out, quality

    def parse_lora(self, body: dict) -> tuple:
        """"lora": a name given to `serve --lora NAME=FILE`, "lora_scale": its strength (default 1.0)."""
        from zimage_trt.runtime.lora import check_strength

        loras = self.service.loras
        name, scale = _field(body, "lora"), body.get("lora_scale", 1.0)
        if name is None:
            if "lora_scale" in body and scale is not None:
                raise ApiError(400, "'lora_scale' needs 'lora'", "lora_scale", "invalid_lora_scale")
            return ()
        served = ", ".join(sorted(loras)) or "none (start the server with --lora NAME=FILE)"
        if not isinstance(name, str) or name not in loras:
            raise ApiError(400, f"'lora' must be one of the server's LoRAs: {served}", "lora", "unknown_lora")
        try:
            scale = check_strength(1.0 if scale is None else scale, "'lora_scale'")
        except UserError as exc:
            raise ApiError(400, str(exc), "lora_scale", "invalid_lora_scale") from None
        return (name, scale) if scale != 0 else ()

    def parse_guidance(self, body: dict):
        """guidance_scale (default 0: none, the Turbo model's setting), negative_prompt, cfg_normalization and
        cfg_truncation, as diffusers' ZImagePipeline takes them; None when guidance is off."""
        from zimage_trt.runtime.pipeline import Guidance

        def number(name, default, lo, hi):
            value = body.get(name, default)
            if value is None:
                value = default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ApiError(400, f"'{name}' must be a number from {lo:g} to {hi:g}", name, f"invalid_{name}")
            return float(value)

        scale = number("guidance_scale", 0.0, 0.0, MAX_GUIDANCE)
        normalization = number("cfg_normalization", 0.0, 0.0, 10.0)
        truncation = number("cfg_truncation", 1.0, 0.0, 1e9)
        negative = body.get("negative_prompt")
        negative = "" if negative is None else negative
        negative = check_text(negative, "negative_prompt", self.opts.max_prompt_chars, allow_empty=True)
        if scale == 0.0:
            return None
        return Guidance(scale, negative, normalization, truncation)

    def parse_size(self, size) -> tuple[int, int]:
        """'auto' (the opt size) or 'WIDTHxHEIGHT' within the served range; a 400 that states the range."""
        from zimage_trt.runtime.sizes import parse_size

        sizes = self.service.sizes
        if size == "auto":
            return sizes.opt
        try:
            width, height = parse_size(size) if isinstance(size, str) else (None, None)
        except UserError:
            width = None
        if width is None:
            raise ApiError(400, f"'size' must be 'auto' or 'WIDTHxHEIGHT' such as '1024x1024'; served: "
                           f"{sizes.describe()}", "size", "invalid_size")
        try:
            sizes.check(width, height, "the served range")  # off the 16-pixel grid or out of range
        except UserError as exc:
            raise ApiError(400, str(exc), "size", "unsupported_size") from None
        return width, height
