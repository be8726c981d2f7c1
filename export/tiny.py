"""`zimage-trt make-tiny`: a random Z-Image-Turbo of the real architecture, small enough for a CPU.

It is written in the layout of `Tongyi-MAI/Z-Image-Turbo` (model_index.json and one folder per component), so
the real loading code reads it. The tokenizer is a real byte-level BPE trained here with `tokenizers`, shaped
like Qwen's: the same pre-tokenizer split, byte-level alphabet, NFC normalizer, Qwen's special tokens and a
ChatML chat template that renders a single user turn exactly as Qwen3's template does.
The same seed gives byte-identical weights and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import configs
from .checkpoint import COMPONENT_CLASSES

# Qwen2/Qwen3's pre-tokenizer pattern (a published fact about the tokenizer, needed to tokenize alike).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special): the special tokens of Qwen3's vocabulary that the chat format uses.
SPECIAL_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<think>", False),
    ("</think>", False),
]

# ChatML as Qwen3 uses it. For one user turn with add_generation_prompt it yields
# "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"; enable_thinking=False adds an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Training text for the tiny BPE: prompts of the kind the model is asked for, in a few scripts.
_CORPUS = """\
A photograph of a red fox sitting in fresh snow at sunrise, soft golden light, shallow depth of field.
An astronaut riding a horse across a desert under a violet sky, cinematic lighting, 35mm film grain.
A cozy reading nook with a window seat, rain on the glass, warm lamp light, watercolor illustration.
Close-up portrait of an old fisherman with a weathered face, dramatic side light, black and white.
A steam locomotive crossing a stone viaduct in autumn, mist in the valley, highly detailed.
A bowl of ramen with a soft egg, scallions and chili oil, top-down food photography.
Minimalist poster of a lighthouse at night, bold geometric shapes, two colors, screen print style.
A futuristic city street after rain, neon signs reflected in puddles, people with umbrellas.
A hand-drawn map of an imaginary island with mountains, rivers, a castle and a compass rose.
一只橘猫趴在窗台上晒太阳，窗外是樱花，柔和的光线，写实摄影。
一幅水墨山水画，远山云雾缭绕，近处有一叶扁舟。
Un café parisien au coucher du soleil, terrasse animée, style impressionniste.
Ein Leuchtturm an der Nordsee bei Sturm, Wellen brechen an den Felsen.
Numbers and sizes: 1024x1024, 768x1344, 9 steps, seed 42, 3.5 mm, 100% detail.
"""


def build_tokenizer():
    """Train the tiny byte-level BPE. Deterministic: the corpus and trainer settings are fixed."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = _CORPUS.splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer, length=len(lines) * 4)
    from tokenizers import AddedToken

    for content, special in SPECIAL_TOKENS:
        added = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    return tok


def _tokenizer_config(tok) -> dict:
    decoder = {}
    for content, special in SPECIAL_TOKENS:
        decoder[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out: Path) -> int:
    """Write tokenizer.json and tokenizer_config.json into `out`; returns the vocabulary size."""
    tok = build_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_model(out: Path, cfg: dict, seed: int, device: str = "cpu", storage: dict | None = None) -> None:
    """Instantiate each component with random weights from `seed` and save it in the real checkpoint's layout:
    the transformer sharded with an index, the text encoder a sharded Qwen3ForCausalLM (keys `model.`-prefixed,
    lm_head tied so not stored) with generation_config.json, the VAE in one file.

    The weights are drawn in float32 on `device` and stored as `storage` says ({component: (dtype, max shard
    size)}; default: the tiny layout, float32)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    storage = storage or configs.TINY_STORAGE

    def save(module, component):
        dtype, shard = storage[component]
        kwargs = {"max_shard_size": shard} if shard else {}
        module.to(getattr(torch, dtype)).save_pretrained(out / component, safe_serialization=True, **kwargs)

    # Every component draws from its own generator so adding one never changes the others.
    def seeded(offset: int):
        torch.manual_seed(seed * 1000 + offset)

    with torch.device(device):
        seeded(1)
        tcfg = {k: v for k, v in cfg["transformer"].items() if not k.startswith("_")}
        transformer = ZImageTransformer2DModel(**tcfg)
        # Real checkpoints have non-zero pad tokens; zeros would hide a wrong pad position in the tests.
        with torch.no_grad():
            transformer.x_pad_token.normal_(0.0, 1.0)
            transformer.cap_pad_token.normal_(0.0, 1.0)
            # Random init leaves the adaLN and final projections near zero; widen them so every block matters.
            for name, p in transformer.named_parameters():
                if "adaLN_modulation" in name and name.endswith("weight"):
                    p.normal_(0.0, 0.05)
        save(transformer, "transformer")
        del transformer

        seeded(2)
        ecfg = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type")}
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**ecfg))
        save(text_encoder, "text_encoder")
        # the real file; the tiny vocabulary has no Qwen token ids, so it keeps the sampling settings only
        generation = configs.GENERATION_CONFIG
        if not cfg["text_encoder"].get("bos_token_id"):
            generation = {k: v for k, v in generation.items() if not k.endswith("token_id")}
        _write_json(out / "text_encoder" / "generation_config.json", generation)
        del text_encoder

        seeded(3)
        vcfg = {k: v for k, v in cfg["vae"].items() if not k.startswith("_")}
        save(AutoencoderKL(**vcfg), "vae")

    _write_json(out / "scheduler" / "scheduler_config.json", configs.SCHEDULER)
    index = {"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1"}
    index.update({name: list(cls) for name, cls in COMPONENT_CLASSES.items()})
    _write_json(out / "model_index.json", index)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja")


def copy_tokenizer(src: Path, out: Path) -> int:
    """A real tokenizer folder (e.g. Qwen3's, from ../shared/real-model/tokenizer) into the model; its vocab size."""
    import shutil

    from tokenizers import Tokenizer

    src = Path(src)
    if not (src / "tokenizer.json").is_file() or not (src / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"--tokenizer {src} must hold tokenizer.json and tokenizer_config.json")
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()


def make_tiny(out: str | Path, seed: int = 0, size: str = "tiny", device: str = "cpu", tokenizer=None) -> Path:
    """Write a random model to `out` (created; must be empty or absent), in the real checkpoint's layout.

    size "tiny": the small configuration in float32. size "full": the real Z-Image-Turbo configuration, stored as
    the real checkpoint is (fp32 transformer, bf16 text encoder; random weights: for speed, memory and graph
    validity, not for images). tokenizer: a tokenizer folder to use instead of the small one trained here.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory or remove it first")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be tiny or full, not {size!r}")
    out.mkdir(parents=True, exist_ok=True)
    vocab = copy_tokenizer(tokenizer, out / "tokenizer") if tokenizer else write_tokenizer(out / "tokenizer")
    if size == "tiny":
        cfg = configs.tiny(max(vocab, configs.FULL["text_encoder"]["vocab_size"]) if tokenizer else vocab)
        write_model(out, cfg, seed, device)
    else:
        if vocab > configs.FULL["text_encoder"]["vocab_size"]:
            raise ValueError(f"the tokenizer has {vocab} tokens, more than the text encoder's vocabulary")
        write_model(out, configs.FULL, seed, device, configs.FULL_STORAGE)
    return out
