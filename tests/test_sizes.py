"""Any image size from one bundle: the size range, the dynamic graphs, the runtime's views and graph keys, and
parity with diffusers' ZImagePipeline(height, width) at every size the tests pick from the range."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.parity import IMAGE_BOUND_DB, NETWORK_BOUND, run_parity
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.pipeline import ZImageRuntime
from zimage_trt.runtime.sizes import SizeRange, latent_shape, parse_size
from zimage_trt.sessions import open_sessions

from .conftest import PROMPT, RANGE_SIZES, SIZE, SIZE_RANGE
from .test_user_errors import assert_one_line_error, run_cli

CPU = torch.device("cpu")
LO, HI = (int(v) for v in SIZE_RANGE.split(":"))


# ------------------------------------------------------------------------------------------ the size range
def test_parse_size_is_width_by_height():
    assert parse_size("1536x1024") == (1536, 1024)
    assert parse_size(" 832 X 1216 ") == (832, 1216)
    for bad in ("1024", "1024x", "x1024", "1024*1024", "-16x16", "1e3x16", ""):
        with pytest.raises(UserError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_a_range_covers_multiples_of_16_inside_it():
    r = SizeRange.square_range("512:2048", (1024, 1024))
    for w, h in [(512, 512), (2048, 2048), (1536, 1024), (1024, 1536), (1344, 768), (768, 1344), (1152, 896)]:
        assert r.covers(w, h)
    for w, h in [(496, 512), (2064, 1024), (1000, 1024), (1024, 1032)]:
        assert not r.covers(w, h)
    assert r.latent_dims() == {"latent_height": (64, 128, 256), "latent_width": (64, 128, 256)}
    assert SizeRange.from_dict(r.to_dict()) == r
    assert latent_shape(1536, 1024) == (1, 16, 128, 192)  # width x height in, [.., h, w] out


@pytest.mark.parametrize(
    "spec, opt, needle",
    [
        ("512-2048", (1024, 1024), "MIN:MAX"),
        ("500:2048", (1024, 1024), "multiple of 16"),
        ("2048:512", (1024, 1024), "larger than the maximum"),
        ("512:768", (1024, 1024), "--opt-size 1024x1024 is outside --size-range 512:768"),
    ],
)
def test_bad_ranges_are_one_line(spec, opt, needle):
    with pytest.raises(UserError, match=needle):
        SizeRange.square_range(spec, opt)


@pytest.mark.parametrize(
    "spec, opt",
    [("512:2048", (1024, 1024)), ("256:768", (768, 768)), ("1280:2048", (1280, 1280)), ("1024:1024", (1024, 1024))],
)
def test_the_default_opt_size_is_1024_or_the_nearest_size_in_the_range(spec, opt):
    from zimage_trt.cli import build_parser
    from zimage_trt.cli_export import _export_sizes

    assert SizeRange.square_range(spec).opt == opt
    # what `export --size-range SPEC` without --opt-size makes of it (was: "--opt-size 1024x1024 is outside ...")
    args = build_parser().parse_args(["export", "--model", "m", "--out", "o", "--size-range", spec])
    assert _export_sizes(args).opt == opt


def test_the_box_around_sizes_and_intersections():
    box = SizeRange.covering([(1536, 1024), (1024, 1536)], opt=(1024, 1024))
    assert (box.min_width, box.max_width, box.min_height, box.max_height) == (1024, 1536, 1024, 1536)
    assert box.opt == (1024, 1024)  # the bundle's opt is inside the box, so it stays the opt
    assert SizeRange.covering([(768, 1344)], opt=(1024, 1024)).opt == (768, 1344)
    full = SizeRange.square_range("512:2048", (1024, 1024))
    assert full.intersect(box) == box and box.intersect(SizeRange.single(512, 512)) is None


def test_a_size_off_the_grid_or_out_of_range_is_refused_with_the_range():
    r = SizeRange.square_range("512:2048", (1024, 1024))
    with pytest.raises(UserError, match=r"size 1000x1024: width and height must be multiples of 16;.*512\.\.2048"):
        r.check(1000, 1024)
    with pytest.raises(UserError, match=r"size 4096x1024 is outside this bundle: width 512\.\.2048"):
        r.check(4096, 1024)


# ------------------------------------------------------------------------------------------ the bundle
def test_the_range_bundle_records_its_sizes_and_dynamic_graphs(fp32_range_bundle):
    bundle = Bundle.open(fp32_range_bundle)
    m = bundle.manifest
    assert m["version"] == 2 and m["image_sizes"]["dynamic"] is True
    assert bundle.sizes == SizeRange.square_range(SIZE_RANGE, (SIZE, SIZE))
    assert (m["height"], m["width"]) == (SIZE, SIZE)  # the opt size
    for name in ("transformer", "vae_decoder"):
        latents = next(i for i in m["networks"][name]["inputs"] if i["name"] == "latents")
        assert latents["shape"] == [1, 16, "latent_height", "latent_width"]
    # The export checked each graph at the range's corners and its opt size.
    checked = {c["name"] for c in m["checks"]}
    for size in (f"{LO}x{LO}", f"{SIZE}x{SIZE}", f"{HI}x{HI}"):
        assert {f"transformer@{size}", f"vae_decoder@{size}"} <= checked
    assert all(c["rel"] <= 1e-4 for c in m["checks"])


def test_a_version_1_bundle_loads_as_one_size(fp32_bundle, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(fp32_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 1
    manifest.pop("image_sizes")
    (old / "manifest.json").write_text(json.dumps(manifest))
    bundle = Bundle.open(old)
    assert bundle.sizes == SizeRange.single(SIZE, SIZE) and bundle.sizes.is_single
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    assert rt.generate(PROMPT, 0).shape == (SIZE, SIZE, 3)
    with pytest.raises(UserError, match=f"size 64x64 is outside bundle {old}: {SIZE}x{SIZE}; export a bundle"):
        rt.generate(PROMPT, 0, size=(64, 64))


# ------------------------------------------------------------------------------------------ the runtime
@pytest.fixture(scope="module")
def range_runtime(fp32_range_bundle):
    bundle = Bundle.open(fp32_range_bundle)
    return ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)


def test_buffers_are_allocated_once_at_the_largest_size(range_runtime):
    rt = range_runtime
    assert rt._latents_store.numel() == 16 * (HI // 8) ** 2 and rt._image_store.numel() == 3 * HI * HI
    stores = (rt._latents_store.data_ptr(), rt._velocity_store.data_ptr(), rt._image_store.data_ptr())
    for w, h in RANGE_SIZES:
        image = rt.generate("a bowl of ramen", 1, size=(w, h))
        assert image.shape == (h, w, 3)
        assert rt.latents.shape == latent_shape(w, h) and rt.latents.is_contiguous()
        assert rt.latents.data_ptr() == stores[0] and rt.image.data_ptr() == stores[2]
    assert (rt._latents_store.data_ptr(), rt._velocity_store.data_ptr(), rt._image_store.data_ptr()) == stores


@pytest.mark.parametrize("size", RANGE_SIZES)
def test_initial_noise_is_diffusers_at_that_size(range_runtime, reference_pipeline, size):
    width, height = size
    range_runtime.use_size(width, height)
    range_runtime.init_latents(99)
    want = reference_pipeline.prepare_latents(
        1, 16, height, width, torch.float32, "cpu", torch.Generator("cpu").manual_seed(99)
    )
    assert torch.equal(range_runtime.latents, want)


def test_the_same_size_twice_gives_the_same_image_after_other_sizes(range_runtime):
    first = range_runtime.generate(PROMPT, 5, size=(96, 128))
    range_runtime.generate(PROMPT, 5, size=(160, 160))
    assert np.array_equal(first, range_runtime.generate(PROMPT, 5, size=(96, 128)))


def test_the_runtime_refuses_a_size_outside_the_range(range_runtime):
    with pytest.raises(UserError, match=rf"size 176x128 is outside bundle .*width {LO}\.\.{HI}, height {LO}\.\.{HI}"):
        range_runtime.generate(PROMPT, 0, size=(176, 128))
    with pytest.raises(UserError, match="multiples of 16"):
        range_runtime.generate(PROMPT, 0, size=(120, 128))


# ------------------------------------------------------------------------------------------ parity
def _check_rows(rows, precision):
    for row in rows:
        assert row.ok, row.cells()
    sizes = [r for r in rows if r.stage.startswith("image")]
    assert len(sizes) == len(RANGE_SIZES)
    assert all(r.psnr >= IMAGE_BOUND_DB[precision] for r in sizes)
    networks = [r for r in rows if r.stage.startswith(("transformer", "vae_decoder"))]
    assert len(networks) == 2 * len(RANGE_SIZES)
    return rows


def test_fp32_parity_with_diffusers_at_every_size(tiny_model, fp32_range_bundle):
    """Per network and end to end against ZImagePipeline(height, width): corners, both orientations, padding."""
    bundle = Bundle.open(fp32_range_bundle)
    sessions = open_sessions("onnxruntime", bundle, CPU)
    rows = _check_rows(run_parity(tiny_model, bundle, sessions, "onnxruntime", PROMPT, 42, CPU, RANGE_SIZES), "fp32")
    assert all(r.rel <= NETWORK_BOUND["fp32"] for r in rows if r.psnr is None)


def test_fp16_parity_with_diffusers_at_every_size(tiny_model, fp16_bundle):
    bundle = Bundle.open(fp16_bundle)
    sessions = open_sessions("onnxruntime", bundle, CPU)
    _check_rows(run_parity(tiny_model, bundle, sessions, "onnxruntime", PROMPT, 42, CPU, RANGE_SIZES), "fp16")


def test_torch_backend_takes_any_size_too(tiny_model, fp32_range_bundle, reference_pipeline):
    from zimage_trt.parity import psnr

    bundle = Bundle.open(fp32_range_bundle)
    rt = ZImageRuntime(bundle, open_sessions("torch", bundle, CPU, model_dir=tiny_model), CPU)
    ours = rt.generate(PROMPT, 3, size=(144, 80))
    theirs = reference_pipeline(PROMPT, height=80, width=144, num_inference_steps=9, guidance_scale=0.0,
                                generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert psnr(ours, (theirs * 255).round().astype(np.uint8)) >= IMAGE_BOUND_DB["fp32"]


# ------------------------------------------------------------------------------------------ the CLI
def test_generate_size_writes_that_size(capsys, fp32_range_bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "wide.png"
    code = __import__("zimage_trt.cli", fromlist=["main"]).main(
        ["generate", "--bundle", str(fp32_range_bundle), "--device", "cpu", "--prompt", PROMPT, "--size", "160x96",
         "--out", str(out)])
    assert code == 0 and Image.open(out).size == (160, 96)
    assert "160x96" in capsys.readouterr().out


@pytest.mark.parametrize(
    "size, needle",
    [("192x128", f"outside bundle"), ("100x100", "multiples of 16"), ("wide", "WIDTHxHEIGHT")],
)
def test_generate_refuses_a_size_in_one_line(capsys, fp32_range_bundle, tmp_path, size, needle):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_range_bundle), "--device", "cpu", "--prompt", "a",
                        "--size", size, "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.png").exists()


def test_a_one_size_bundle_refuses_other_sizes(capsys, fp32_bundle, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--device", "cpu", "--prompt", "a",
                        "--size", "64x64", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, f"size 64x64 is outside bundle {fp32_bundle}: {SIZE}x{SIZE}")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--size-range", "512"], "MIN:MAX"),
        (["--size-range", "512:2024"], "multiple of 16"),
        (["--size-range", "64:256", "--opt-size", "512x512"], "outside --size-range"),
        (["--size-range", "64:256", "--width", "128"], "exclude each other"),
        (["--opt-size", "128x128"], "--opt-size goes with --size-range"),
        (["--size-range", "64:256", "--opt-size", "big"], "WIDTHxHEIGHT"),
    ],
)
def test_bad_size_options_for_export(capsys, tiny_model, tmp_path, extra, needle):
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(tmp_path / "b"), *extra)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "b").exists()


def test_a_range_of_one_size_is_a_one_size_bundle_at_that_size(capsys, tiny_model, tmp_path):
    from zimage_trt.cli import main

    out = tmp_path / "b"
    assert main(["export", "--model", str(tiny_model), "--out", str(out), "--size-range", "96:96", "--opt-size",
                 "96x96", "--precision", "fp32", "--check", "never"]) == 0
    bundle = Bundle.open(out)
    assert bundle.sizes == SizeRange.single(96, 96) and not bundle.manifest["image_sizes"]["dynamic"]
    latents = next(i for i in bundle.network("transformer")["inputs"] if i["name"] == "latents")
    assert latents["shape"] == [1, 16, 12, 12]
