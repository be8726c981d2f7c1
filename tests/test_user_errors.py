"""Everything a user can do wrong gets one line that names the problem, and exit status 2 from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from zimage_trt.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    """Exit 2, no traceback, and the last line (after any progress bar) is the one error line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("error: "), err
    for needle in needles:
        assert needle in line, err


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_missing_model_dir(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")),
                          "does not exist")


def test_folder_without_model_index(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "export", "--model", str(tmp_path), "--out", str(tmp_path / "b")),
                          "model_index.json")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "component 'vae' is incomplete"),
        (lambda d: shutil.rmtree(d / "tokenizer"), "component 'tokenizer' is missing"),
        (lambda d: (d / "model_index.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"})), "FluxPipeline"),
        (lambda d: (d / "transformer" / "config.json").write_text("{broken"), "component 'transformer'"),
        (lambda d: (d / "text_encoder" / "model-00001-of-00003.safetensors").write_bytes(b"truncated"),
         "component 'text_encoder'"),
        (lambda d: truncate(d / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors"), "is truncated"),
        (lambda d: (d / "transformer" / "diffusion_pytorch_model-00003-of-00003.safetensors").unlink(),
         "shard diffusion_pytorch_model-00003-of-00003.safetensors is missing"),
    ],
)
def test_broken_model_parts_are_named(capsys, model_copy, tmp_path, damage, needle):
    damage(model_copy)
    code, err = run_cli(capsys, "export", "--model", str(model_copy), "--out", str(tmp_path / "b"), "--check", "never")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))  # nothing half-built is left


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--height", "1000"], "multiple of 16"),
        (["--width", "0"], "multiple of 16"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--max-gpu-memory", "22GiB"], "add --device cuda"),
        (["--max-gpu-memory", "lots", "--device", "cuda"], "is not a size"),
    ],
)
def test_bad_export_options(capsys, tiny_model, tmp_path, extra, needle):
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(tmp_path / "b"), *extra)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "b").exists()


def test_vae_fp16_is_refused(capsys, tiny_model, tmp_path):
    from zimage_trt.common.errors import UserError
    from zimage_trt.export.bundle import ExportOptions, export_bundle

    with pytest.raises(UserError, match="overflows in fp16"):
        export_bundle(tiny_model, tmp_path / "b", ExportOptions(precision={"vae_decoder": "fp16"}))


def test_existing_output_needs_force(capsys, tiny_model, fp32_bundle):
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(fp32_bundle))
    assert_one_line_error(code, err, "already exists", "--force")


def test_generate_with_missing_bundle(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(tmp_path / "x"), "--prompt", "a", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "does not exist", "zimage-trt export")


def test_generate_with_a_folder_that_is_not_a_bundle(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "no manifest.json")


def test_generate_with_a_bundle_missing_a_graph(capsys, fp32_bundle, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, broken)
    (broken / "vae_decoder.onnx").unlink()
    code, err = run_cli(capsys, "generate", "--bundle", str(broken), "--prompt", "a", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "missing vae_decoder.onnx")


def test_generate_into_a_missing_folder(capsys, fp32_bundle, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--device", "cpu",
                        "--out", str(tmp_path / "no" / "such" / "o.png"))
    assert_one_line_error(code, err, "does not exist")


def test_empty_prompt(capsys, fp32_bundle, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "   ", "--device", "cpu",
                        "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "prompt is empty")


def test_torch_backend_needs_the_model(capsys, fp32_bundle, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--backend", "torch",
                        "--device", "cpu", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "needs --model")


def test_bf16_graph_on_onnxruntime_cpu(capsys, fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["networks"]["vae_decoder"]["precision"] = "bf16"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "generate", "--bundle", str(bundle), "--prompt", "a", "--device", "cpu",
                        "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "BF16", "fp32")


def test_bundle_from_a_newer_format(capsys, fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "generate", "--bundle", str(bundle), "--prompt", "a", "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, "format version 99", "re-export")


def test_make_tiny_refuses_a_non_empty_folder(capsys, tmp_path):
    (tmp_path / "x").write_text("keep me")
    assert_one_line_error(*run_cli(capsys, "make-tiny", str(tmp_path)), "not empty")


def test_generate_writes_a_png(capsys, fp32_bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    assert main(["generate", "--bundle", str(fp32_bundle), "--prompt", "a red fox", "--seed", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (128, 128) and image.mode == "RGB"
    assert not list(tmp_path.glob(".img.png.tmp-*"))


@pytest.mark.parametrize("command", ["", "make-tiny", "export", "generate", "parity", "demo"])
def test_help_answers(command):
    argv = [sys.executable, "-m", "zimage_trt.cli"] + ([command] if command else []) + ["--help"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "usage: zimage-trt" in out
    if command == "export":
        assert "--dit-precision" in out and "--vae-precision" in out


@pytest.mark.parametrize("device, needle", [("gpu", "is not a device"), ("mps", "runs on cpu or cuda"),
                                            ("cuda:7", "cuda:7")])
def test_a_device_that_is_not_here_is_one_line(capsys, fp32_bundle, tmp_path, device, needle):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--device", device,
                        "--out", str(tmp_path / "o.png"))
    assert_one_line_error(code, err, needle)


def test_sizes_parse_in_binary_and_decimal_units():
    from zimage_trt.cli_args import parse_bytes

    assert parse_bytes("22GiB", "x") == 22 * 2**30 and parse_bytes("20GB", "x") == 20 * 10**9
    assert parse_bytes("22", "x") == 22 * 2**30 and parse_bytes("512MiB", "x") == 512 * 2**20
