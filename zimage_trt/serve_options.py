"""What `zimage-trt serve` is asked to do (ServeOptions, with every limit and its default) and the one error
shape it answers with (ApiError, OpenAI's `{"error": {"message", "type", "param", "code"}}`).

The limits bound what one request may cost before it is refused: the body's bytes and read time, the prompt's
characters, the connections held open. Worst case held in request bodies: max_connections x max_body_bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0  # far beyond any useful scale; a larger one is a client's mistake
MAX_FIELD_CHARS = 256  # every string field but the prompts (size, lora, model, user, formats): names, not text
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON: a 32,000-character prompt even in \uXXXX escapes is 192 KB
DEFAULT_MAX_PROMPT_CHARS = 32_000  # OpenAI's limit for gpt-image-1; the model reads the first 512 tokens
DEFAULT_BODY_TIMEOUT = 10.0  # seconds for the whole body (1 MiB: 100 KiB/s at least)
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE = 5.0  # uvicorn's own default
DEFAULT_MAX_CONNECTIONS = 256


@dataclass
class ServeOptions:
    bundle: str
    backend: str = "onnxruntime"
    engines: str | None = None
    model: str | None = None
    device: str = "auto"
    torch_dtype: str = "fp32"
    queue_size: int = 8  # requests waiting for the GPU, beyond the one it runs
    timeout_s: float = 120.0  # a request's deadline, from arrival
    max_n: int = 4
    max_steps: int = 50
    warmup: bool = True
    loras: dict | None = None  # name -> converted LoRA file (`zimage-trt lora`), loaded at start
    vram: str = "all"  # all | sequential (runtime.pipeline.VRAM_MODES)
    weight_budget: int | None = None  # bytes of transformer weights on the GPU (engines with weight streaming)
    # access: keys a request must present as `Authorization: Bearer KEY` (none: loopback only, or no_auth)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed with the options
    no_auth: bool = False  # serve without keys on a non-loopback address, deliberately
    metrics_public: bool = False  # /metrics without a key (a scraper inside the private network)
    # bounded input
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # prompt and negative_prompt, checked before tokenizing
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT  # the whole body must arrive within this, after the headers
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT  # the request line and headers must arrive within this
    keep_alive_s: float = DEFAULT_KEEP_ALIVE  # an idle keep-alive connection is closed after this
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open connections; more are answered 503


class ApiError(Exception):
    """An error answer in the OpenAI shape."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def too_long(param: str, limit: int, length: int) -> ApiError:
    """OpenAI's own wording and code for a string over its limit."""
    return ApiError(400, f"Invalid '{param}': string too long. Expected a string with maximum length {limit}, "
                    f"but got a string with length {length} instead.", param, "string_above_max_length")
