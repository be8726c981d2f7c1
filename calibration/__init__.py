"""Calibration data: the prompts whose activation peaks set the FP16 rescale (see export/fp16.py)."""

from importlib import resources


def default_prompts() -> list[str]:
    text = resources.files(__name__).joinpath("prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
