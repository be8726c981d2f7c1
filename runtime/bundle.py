"""Read an export bundle (see export/bundle.py for its layout) and refuse one this runtime cannot use.

Version 2 bundles record the image sizes they cover (`image_sizes`, a SizeRange); version 1 bundles, written
before sizes were dynamic, are read as one-size bundles at their `height` x `width`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zimage_trt.common.errors import UserError

from .sizes import SizeRange, latent_shape

BUNDLE_FORMAT = "zimage-trt-bundle"
BUNDLE_VERSION = 2
READABLE_VERSIONS = (1, 2)
NETWORKS = ("text_encoder", "transformer", "vae_decoder")


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, path) -> "Bundle":
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"bundle {root} does not exist; create one with `zimage-trt export --model DIR --out {root}`")
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise UserError(f"{root} is not a bundle: it has no manifest.json (was the export interrupted?)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{mpath} is not valid JSON ({exc})") from None
        if manifest.get("format") != BUNDLE_FORMAT:
            raise UserError(f"{mpath} is not a zimage-trt bundle manifest")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise UserError(
                f"bundle {root} has format version {manifest.get('version')}, this runtime reads {BUNDLE_VERSION};"
                " re-export it with this version of zimage-trt"
            )
        for name in NETWORKS:
            net = manifest.get("networks", {}).get(name)
            if not net:
                raise UserError(f"bundle {root} has no '{name}' network in its manifest")
            if not (root / net["onnx"]).is_file():
                raise UserError(f"bundle {root} is missing {net['onnx']}")
        for f in ("tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"):
            if not (root / f).is_file():
                raise UserError(f"bundle {root} is missing {f}")
        return cls(root, manifest)

    @property
    def sizes(self) -> SizeRange:
        """The image sizes the bundle's graphs take (one size for a static bundle)."""
        if "image_sizes" in self.manifest:
            return SizeRange.from_dict(self.manifest["image_sizes"])
        return SizeRange.single(self.width, self.height)

    @property
    def height(self) -> int:
        """The default (opt) image height."""
        return int(self.manifest["height"])

    @property
    def width(self) -> int:
        """The default (opt) image width."""
        return int(self.manifest["width"])

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["latent_shape"][1])

    def latent_shape_for(self, width: int, height: int) -> tuple[int, ...]:
        return latent_shape(width, height, self.latent_channels)

    @property
    def caption_dim(self) -> int:
        return int(self.manifest["caption_dim"])

    @property
    def max_caption_tokens(self) -> int:
        return int(self.manifest["max_caption_tokens"])

    @property
    def caption_multiple(self) -> int:
        return int(self.manifest["caption_multiple"])

    @property
    def scheduler(self) -> dict:
        return self.manifest["scheduler"]

    def network(self, name: str) -> dict:
        return self.manifest["networks"][name]

    def onnx_path(self, name: str) -> Path:
        return self.root / self.network(name)["onnx"]

    def padded_caption_length(self, n_tokens: int) -> int:
        m = self.caption_multiple
        return -(-n_tokens // m) * m
