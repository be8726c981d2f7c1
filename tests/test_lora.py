"""LoRA: converted once per bundle, applied at run time with a strength (onnxruntime and torch backends), baked at
export, served by name; each image against diffusers' load_lora_weights + set_adapters on the original files."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from zimage_trt.cli import main
from zimage_trt.common.errors import UserError
from zimage_trt.parity import IMAGE_BOUND_DB, psnr, run_parity
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.lora import load_lora
from zimage_trt.runtime.pipeline import ZImageRuntime
from zimage_trt.sessions import open_sessions

from .conftest import ALL_FP32, PROMPT, SIZE
from .lora_files import write_kohya_lora, write_peft_lora
from .test_user_errors import assert_one_line_error, run_cli

CPU = torch.device("cpu")
SEED = 42
# (stack of (lora, strength)) cases; "a" is the PEFT-format LoRA (lora_alpha 8, r 4), "b" the kohya one (alpha 2,
# rank 8): neither has alpha == rank, so the scaling is exercised in both formats.
CASES = [(("a", 0.5),), (("a", 1.0),), (("b", 0.5),), (("b", 1.0),), (("a", 0.5), ("b", 1.0))]


@pytest.fixture(scope="module")
def originals(tiny_model, tmp_path_factory):
    from zimage_trt.export.checkpoint import load_transformer

    folder = tmp_path_factory.mktemp("loras")
    dit = load_transformer(tiny_model, torch.float32)
    write_peft_lora(dit, folder / "a-peft.safetensors")
    write_kohya_lora(dit, folder / "b-kohya.safetensors")
    return {"a": folder / "a-peft.safetensors", "b": folder / "b-kohya.safetensors"}


@pytest.fixture(scope="module")
def converted(fp32_bundle, originals, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted")
    out = {}
    for key, path in originals.items():
        out[key] = folder / f"{key}.safetensors"
        assert main(["lora", "--bundle", str(fp32_bundle), "--lora", str(path), "--out", str(out[key])]) == 0
    return out


@pytest.fixture(scope="module")
def diffusers_images(tiny_model, originals):
    """diffusers' image for each case: both adapters loaded once, set_adapters per case."""
    from zimage_trt.export.checkpoint import load_pipeline

    pipe = load_pipeline(tiny_model, torch.float32, "cpu")
    pipe.set_progress_bar_config(disable=True)
    for key, path in originals.items():
        pipe.load_lora_weights(str(path), adapter_name=key)
    images = []
    for case in CASES:
        pipe.set_adapters([k for k, _ in case], [s for _, s in case])
        image = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=9, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images[0]
        images.append((image * 255).round().astype(np.uint8))
    return images


def runtime(backend, bundle_dir, tiny_model):
    bundle = Bundle.open(bundle_dir)
    return bundle, ZImageRuntime(bundle, open_sessions(backend, bundle, CPU, model_dir=tiny_model), CPU)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_loras_at_strengths_and_stacked_match_diffusers(backend, tiny_model, fp32_bundle, converted, diffusers_images):
    bundle, rt = runtime(backend, fp32_bundle, tiny_model)
    loras = {k: load_lora(p, bundle) for k, p in converted.items()}
    base = rt.generate(PROMPT, SEED)
    for case, theirs in zip(CASES, diffusers_images):
        rt.set_loras([(loras[k], s) for k, s in case])
        ours = rt.generate(PROMPT, SEED)
        assert psnr(ours, theirs) >= IMAGE_BOUND_DB["fp32"], case
        assert psnr(ours, base) < 40, case  # the LoRA changed the image: the comparison means something


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_swapping_base_a_b_none_gives_the_base_back_bit_exactly(backend, tiny_model, fp32_bundle, converted):
    bundle, rt = runtime(backend, fp32_bundle, tiny_model)
    a, b = load_lora(converted["a"], bundle), load_lora(converted["b"], bundle)
    base = rt.generate(PROMPT, SEED)
    rt.set_loras([(a, 1.0)])
    with_a = rt.generate(PROMPT, SEED)
    rt.set_loras([(b, 0.5)])
    with_b = rt.generate(PROMPT, SEED)
    rt.set_loras([])
    assert np.array_equal(rt.generate(PROMPT, SEED), base)
    assert not np.array_equal(with_a, base) and not np.array_equal(with_b, with_a)
    if backend == "torch":  # the parameters themselves, not only the image
        from zimage_trt.export.reference import reference_modules

        fresh = reference_modules(tiny_model)["transformer"].state_dict()
        for name, value in rt.transformer.module.state_dict().items():
            assert torch.equal(value, fresh[name]), name


def test_parity_command_with_a_stack(capsys, tiny_model, fp32_bundle, converted):
    bundle = Bundle.open(fp32_bundle)
    sessions = open_sessions("onnxruntime", bundle, CPU)
    stack = [(load_lora(converted["a"], bundle), 0.5), (load_lora(converted["b"], bundle), 1.0)]
    rows = run_parity(tiny_model, bundle, sessions, "onnxruntime", PROMPT, SEED, CPU, loras=stack)
    assert all(r.ok for r in rows) and "a-peft:0.5, b-kohya:1" in rows[-1].stage
    # the sessions got their base weights back
    rt = ZImageRuntime(bundle, sessions, CPU)
    assert np.array_equal(rt.generate(PROMPT, 1), ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU),
                                                                 CPU).generate(PROMPT, 1))


def test_a_baked_lora_is_the_runtime_lora(tiny_model, fp32_bundle, originals, converted, tmp_path):
    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.common.files import sha256_of

    out = tmp_path / "baked"
    opts = ExportOptions(height=SIZE, width=SIZE, precision=dict(ALL_FP32), check="never",
                         loras=[(str(originals["a"]), 0.5)])
    manifest = export_bundle(tiny_model, out, opts)
    assert manifest["loras"] == [{"name": "a-peft", "sha256": sha256_of([originals["a"]]), "scale": 0.5, "weights": 42}]
    baked = ZImageRuntime(Bundle.open(out), open_sessions("onnxruntime", Bundle.open(out), CPU), CPU)
    bundle, rt = runtime("onnxruntime", fp32_bundle, tiny_model)
    rt.set_loras([(load_lora(converted["a"], bundle), 0.5)])
    assert psnr(baked.generate(PROMPT, SEED), rt.generate(PROMPT, SEED)) >= 60


def test_cli_generate_and_bench_with_loras(capsys, tiny_model, fp32_bundle, converted, tmp_path):
    png = tmp_path / "l.png"
    assert main(["generate", "--bundle", str(fp32_bundle), "--prompt", PROMPT, "--device", "cpu", "--out", str(png),
                 "--lora", f"{converted['a']}:0.7", "--lora", str(converted["b"])]) == 0
    assert "LoRA a-peft:0.7, b-kohya:1 applied in" in capsys.readouterr().out
    assert main(["bench", "--model", str(tiny_model), "--bundle", str(fp32_bundle), "--backends", "torch",
                 "--no-diffusers", "--iters", "1", "--warmup", "0", "--device", "cpu", "--lora", f"{converted['a']}:0.5"
                 ]) == 0
    assert "switching is one weight update: to LoRA" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input
def _damaged(originals, tmp_path, how):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(originals["a"]))
    if how == "unknown key":
        tensors["transformer.layers.99.attention.to_q.lora_A.weight"] = torch.zeros(4, 64)
        tensors["transformer.layers.99.attention.to_q.lora_B.weight"] = torch.zeros(64, 4)
    elif how == "wrong shape":
        key = "transformer.layers.0.attention.to_q.lora_A.weight"
        tensors[key] = torch.zeros(4, tensors[key].shape[1] + 8)
    path = tmp_path / f"{how.replace(' ', '-')}.safetensors"
    save_file(tensors, str(path))
    if how == "truncated":
        data = originals["a"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a LoRA":
        path.write_bytes(b"this is not a safetensors file")
    return path


@pytest.mark.parametrize("how, needle", [
    ("unknown key", "key 'layers.99.attention.to_q.lora_A.weight' names no weight"),
    ("wrong shape", "key 'layers.0.attention.to_q' changes a"),
    ("truncated", "is truncated"),
    ("not a LoRA", "not a safetensors file"),
])
def test_a_lora_that_does_not_fit_is_one_line_and_nothing_is_written_or_applied(
        capsys, tiny_model, fp32_bundle, originals, tmp_path, how, needle):
    bad = _damaged(originals, tmp_path, how)
    out = tmp_path / "out.safetensors"
    code, err = run_cli(capsys, "lora", "--bundle", str(fp32_bundle), "--lora", str(bad), "--out", str(out))
    assert_one_line_error(code, err, needle)
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(tmp_path / "b"), "--check", "never",
                        "--lora", f"{bad}:0.5")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "b").exists()


def test_a_converted_lora_for_another_bundle_or_damaged_is_refused(fp32_bundle, fp16_bundle, converted, tmp_path):
    with pytest.raises(UserError, match="converted for another bundle's transformer; convert it for this bundle"):
        load_lora(converted["a"], Bundle.open(fp16_bundle))
    half = tmp_path / "half.safetensors"
    data = converted["a"].read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot be read"):
        load_lora(half, Bundle.open(fp32_bundle))


def test_a_strength_out_of_range_is_one_line(capsys, fp32_bundle, converted, tmp_path):
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "x", "--device", "cpu",
                        "--out", str(tmp_path / "x.png"), "--lora", f"{converted['a']}:9")
    assert_one_line_error(code, err, "strength must be a number from -4 to 4")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ serving
def test_the_server_switches_loras_per_request(tiny_model, fp32_bundle, converted):
    from .serving import running_server

    pytest.importorskip("fastapi")
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    a = load_lora(converted["a"], bundle)
    with running_server(fp32_bundle, "--lora", f"a={converted['a']}", "--lora", f"b={converted['b']}") as server:
        def image(body):
            status, _, answer = server.post({"prompt": PROMPT, "seed": 3, **body})
            assert status == 200, answer
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))).convert("RGB"))

        with_a = image({"lora": "a", "lora_scale": 0.5})
        base = image({})
        rt.set_loras([(a, 0.5)])
        assert np.array_equal(with_a, rt.generate(PROMPT, 3))
        rt.set_loras([])
        assert np.array_equal(base, rt.generate(PROMPT, 3))
        assert server.metric("zimage_lora_switch_seconds_count") == 2  # to a, back to base
        for body, param, needle in [({"lora": "c"}, "lora", "one of the server's LoRAs: a, b"),
                                    ({"lora": "a", "lora_scale": 5}, "lora_scale", "from -4 to 4"),
                                    ({"lora_scale": 0.5}, "lora_scale", "needs 'lora'"),
                                    ({"lora": ["a"]}, "lora", "one of the server's LoRAs")]:
            status, _, answer = server.post({"prompt": PROMPT, **body})
            assert status == 400 and answer["error"]["param"] == param and needle in answer["error"]["message"], answer
        assert json.loads(server.get("/health")[2])  # still healthy


def test_comfyui_and_kohya_keys_of_one_lora_convert_to_the_same_pairs(tiny_model, originals, tmp_path):
    """The formats differ in their keys only: ComfyUI's `diffusion_model.` keys and kohya's `lora_unet_` keys of
    the same weights give the same low-rank products (diffusers' conversion, alpha / rank folded in)."""
    from safetensors.torch import load_file, save_file

    from zimage_trt.export.lora import read_lora

    kohya = load_file(str(originals["b"]))
    comfy = {}
    for key, value in kohya.items():
        base, _, suffix = key.partition(".")
        module = base.removeprefix("lora_unet_")
        for group in ("noise_refiner", "context_refiner", "layers"):
            if module.startswith(group + "_"):
                block, _, rest = module[len(group) + 1:].partition("_")
                rest = rest.replace("attention_to_", "attention.to_").replace("feed_forward_", "feed_forward.")
                rest = rest.replace("to_out_0", "to_out.0")
                module = f"{group}.{block}.{rest}"
        comfy[f"diffusion_model.{module}.{suffix}"] = value
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    a, b = read_lora(originals["b"]), read_lora(tmp_path / "comfy.safetensors")
    assert a.keys() == b.keys() and len(a) == 42
    for name in a:
        assert torch.allclose(a[name][0] @ a[name][1], b[name][0] @ b[name][1], rtol=1e-6, atol=1e-7), name
