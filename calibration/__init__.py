"""Calibration data: the prompts whose activation peaks set the FP16 rescale (see export/fp16.py)."""

from importlib import resources


def parse_prompts(text: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def default_prompts() -> list[str]:
    return parse_prompts(resources.files(__name__).joinpath("prompts.txt").read_text(encoding="utf-8"))
