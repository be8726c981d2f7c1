"""Engines: real TensorRT-RTX builds on this CPU-only machine (ahead of time, for RTX compute capabilities),
their sidecars, rebuilding only what is stale, and every refusal a user can meet. Running engines needs a GPU
that the library supports; those tests are in test_engines_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import shutil

import onnx
import pytest
import torch

from zimage_trt.engine import sidecar
from zimage_trt.engine.build import BuildOptions, build_engines
from zimage_trt.engine.checks import check_host_memory, resolve_targets
from zimage_trt.engine.trt_api import load_flavour
from zimage_trt.common.errors import UserError
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.sizes import SizeRange
from zimage_trt.runtime.trt_session import open_engine_sessions

from .conftest import SIZE, SIZE_RANGE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="tensorrt-rtx is not installed (CI installs tensorrt-rtx-cu13 so this never skips there)",
)

TARGETS = ["sm89", "sm120"]
H200 = {"name": "NVIDIA H200", "compute_capability": "sm90", "cc": (9, 0)}
RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "sm89", "cc": (8, 9)}
RTX5090 = {"name": "NVIDIA GeForce RTX 5090", "compute_capability": "sm120", "cc": (12, 0)}


@pytest.fixture(scope="module")
def engines(fp16_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "rtx"
    results = build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS))
    return out, results


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_three_engines_are_built_with_sidecars(engines, fp16_bundle):
    out, results = engines
    bundle = Bundle.open(fp16_bundle)
    assert [r.network for r in results] == ["text_encoder", "transformer", "vae_decoder"]
    assert all(r.status == "built" for r in results)
    flavour = load_flavour("tensorrt-rtx")
    for r in results:
        engine = sidecar.engine_path(out, r.network)
        meta = sidecar.read_sidecar(engine)
        assert meta == r.meta | {"format": "zimage-trt-engine", "version": 1}
        # The sidecar records the image sizes the profile covers (the text encoder takes no image).
        want = None if r.network == "text_encoder" else SizeRange.square_range(SIZE_RANGE, (SIZE, SIZE)).to_dict()
        assert meta["image_sizes"] == want
        assert meta["onnx_sha256"] == bundle.network(r.network)["sha256"]
        assert meta["precision"] == bundle.network(r.network)["precision"]
        assert meta["backend"] == "tensorrt-rtx" and meta["backend_version"] == flavour.version
        assert meta["targets"] == {"compute_capabilities": TARGETS}
        assert meta["build"]["flags"]["strongly_typed"] is True
        assert meta["build"]["flags"]["require_user_allocation"] is True  # RTX: needed for CUDA stream capture
        assert engine.stat().st_size == meta["build"]["engine_bytes"] > 100_000
    assert not list(out.glob(".*tmp*"))


def test_sidecar_io_matches_the_bundle_graphs(engines, fp16_bundle):
    out, _ = engines
    bundle = Bundle.open(fp16_bundle)
    for name in ("text_encoder", "transformer", "vae_decoder"):
        meta = sidecar.read_sidecar(sidecar.engine_path(out, name))
        graph = bundle.network(name)
        want = [(i["name"], i["dtype"]) for i in graph["inputs"]] + [(o["name"], o["dtype"]) for o in graph["outputs"]]
        assert [(i["name"], i["dtype"]) for i in meta["io"]] == want
    dit = {i["name"]: i for i in sidecar.read_sidecar(sidecar.engine_path(out, "transformer"))["io"]}
    c = bundle.caption_dim
    assert dit["cap_feats"]["shape"] == [1, -1, c]
    assert dit["cap_feats"]["profile"] == {"min": [1, 32, c], "opt": [1, 128, c], "max": [1, 512, c]}
    # The bundle covers SIZE_RANGE: the latents' height and width are dynamic over it, tuned at the opt size.
    lo, hi = (int(v) // 8 for v in SIZE_RANGE.split(":"))
    opt = SIZE // 8
    want = {"min": [1, 16, lo, lo], "opt": [1, 16, opt, opt], "max": [1, 16, hi, hi]}
    vae = {i["name"]: i for i in sidecar.read_sidecar(sidecar.engine_path(out, "vae_decoder"))["io"]}
    assert dit["latents"]["shape"] == vae["latents"]["shape"] == [1, 16, -1, -1]
    assert dit["latents"]["profile"] == vae["latents"]["profile"] == want
    assert dit["cap_len"]["dtype"] == "int64" and dit["velocity"]["dtype"] == "float32"
    te = {i["name"]: i for i in sidecar.read_sidecar(sidecar.engine_path(out, "text_encoder"))["io"]}
    assert te["input_ids"]["profile"] == {"min": [1, 1], "opt": [1, 128], "max": [1, 512]}


def test_a_second_build_rebuilds_nothing(engines, fp16_bundle):
    out, first = engines
    again = build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS))
    assert [r.status for r in again] == ["current"] * 3
    assert [r.meta["build"]["engine_sha256"] for r in again] == [r.meta["build"]["engine_sha256"] for r in first]


def test_only_stale_engines_are_rebuilt(engines, fp16_bundle, tmp_path):
    out = copy_tree(engines[0], tmp_path / "engines")
    bundle = copy_tree(fp16_bundle, tmp_path / "bundle")
    # A re-export that changed the transformer: its manifest hash changes.
    edit_json(bundle / "manifest.json", lambda m: m["networks"]["transformer"].update(sha256="0" * 64))
    # An interrupted copy of the VAE engine.
    vae = sidecar.engine_path(out, "vae_decoder")
    vae.write_bytes(vae.read_bytes()[:1000])
    results = {r.network: r for r in build_engines(bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS))}
    assert results["text_encoder"].status == "current"
    assert results["transformer"].status == "built" and "ONNX changed" in results["transformer"].reason
    assert results["vae_decoder"].status == "built" and "size" in results["vae_decoder"].reason
    # New targets make every engine stale, and so does another profile.
    results = build_engines(bundle, out, BuildOptions(backend="tensorrt-rtx", targets=["sm89"]))
    assert all(r.status == "built" and "sm89 asked for" in r.reason for r in results)
    results = build_engines(bundle, out, BuildOptions(backend="tensorrt-rtx", targets=["sm89"], opt_tokens=64,
                                                      networks=("text_encoder",)))
    assert results[0].status == "built" and "'opt_tokens': 64" in results[0].reason
    te = {i["name"]: i for i in results[0].meta["io"]}
    assert te["input_ids"]["profile"]["opt"] == [1, 64]


def test_memory_check_refuses_before_any_build(fp16_bundle, tmp_path):
    bundle = copy_tree(fp16_bundle, tmp_path / "bundle")
    edit_json(bundle / "manifest.json", lambda m: m["networks"]["transformer"].update(bytes=10**15))
    with pytest.raises(UserError, match=r"building transformer needs about .* GB of host memory"):
        build_engines(bundle, tmp_path / "engines", BuildOptions(backend="tensorrt-rtx", targets=TARGETS))
    assert not (tmp_path / "engines").exists()


def test_memory_estimate_for_the_full_dit_on_a_24_gib_machine():
    with pytest.raises(UserError, match=r"about 40\.1 GB of host memory \(3x its 12\.3 GB of weights \+ 3\.2 GB\) "
                                         r"and 22\.0 GB is available"):
        check_host_memory("transformer", 12_300_000_000, 22_000_000_000)
    check_host_memory("transformer", 12_300_000_000, 128_000_000_000)  # the H200 machine: fine


def test_rtx_refuses_a_datacenter_gpu_before_building():
    flavour = load_flavour("tensorrt-rtx")
    with pytest.raises(UserError, match=r"TensorRT-RTX does not support NVIDIA H200 \(compute capability 9\.0\)"):
        resolve_targets(flavour, ["auto"], H200)
    # Building for RTX cards *on* an H200 is fine: the builder needs no matching GPU.
    assert resolve_targets(flavour, ["sm89"], H200)[0] == {"compute_capabilities": ["sm89"]}
    assert resolve_targets(flavour, ["auto"], RTX4090)[0] == {"compute_capabilities": ["sm89"]}


def test_target_errors():
    flavour = load_flavour("tensorrt-rtx")
    with pytest.raises(UserError, match="not a TensorRT-RTX compute capability; choose from"):
        resolve_targets(flavour, ["sm91"], None)
    with pytest.raises(UserError, match="no GPU here to target"):
        resolve_targets(flavour, ["auto"], None)


def test_parse_error_names_the_node(fp16_bundle, tmp_path):
    bundle = copy_tree(fp16_bundle, tmp_path / "bundle")
    node = onnx.helper.make_node("NoSuchOp", ["latents"], ["image"], name="mystery_node", domain="")
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("latents", onnx.TensorProto.FLOAT, [1, 16, 16, 16])],
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 128, 128])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)]), str(bundle / "vae_decoder.onnx"))
    with pytest.raises(UserError, match=r"vae_decoder.onnx does not parse .* node 'mystery_node' \(NoSuchOp\)"):
        build_engines(bundle, tmp_path / "e", BuildOptions(backend="tensorrt-rtx", targets=TARGETS, networks=("vae_decoder",)))


def test_missing_tensorrt_says_how_to_install():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(UserError, match="'tensorrt' is not installed .* pip install tensorrt-cu1"):
        load_flavour("tensorrt")


# ---------------------------------------------------------------- refusals at load time (runtime side)
def test_runtime_refuses_a_stale_engine(engines, fp16_bundle, tmp_path):
    bundle_dir = copy_tree(fp16_bundle, tmp_path / "bundle")
    edit_json(bundle_dir / "manifest.json", lambda m: m["networks"]["transformer"].update(sha256="1" * 64))
    with pytest.raises(UserError, match=r"transformer engine is stale.*zimage-trt build --bundle"):
        open_engine_sessions(Bundle.open(bundle_dir), engines[0], torch.device("cuda"))


def test_runtime_refuses_another_library_version(engines, fp16_bundle, tmp_path):
    out = copy_tree(engines[0], tmp_path / "engines")
    edit_json(sidecar.sidecar_path(sidecar.engine_path(out, "text_encoder")), lambda m: m.update(backend_version="1.6.0.1"))
    with pytest.raises(UserError, match=r"built with tensorrt-rtx 1\.6\.0\.1 but .* is installed"):
        open_engine_sessions(Bundle.open(fp16_bundle), out, torch.device("cuda"))


def test_runtime_refuses_missing_engines_and_sidecars(engines, fp16_bundle, tmp_path):
    bundle = Bundle.open(fp16_bundle)
    with pytest.raises(UserError, match="does not exist; build it"):
        open_engine_sessions(bundle, tmp_path / "nowhere", torch.device("cuda"))
    out = copy_tree(engines[0], tmp_path / "engines")
    sidecar.sidecar_path(sidecar.engine_path(out, "vae_decoder")).unlink()
    with pytest.raises(UserError, match="has no valid sidecar"):
        open_engine_sessions(bundle, out, torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_runtime_says_engines_need_a_gpu(engines, fp16_bundle):
    with pytest.raises(UserError, match="needs a CUDA GPU and PyTorch sees none"):
        open_engine_sessions(Bundle.open(fp16_bundle), engines[0], torch.device("cuda"))


def test_foreign_gpu_is_refused(engines, fp16_bundle):
    bundle = Bundle.open(fp16_bundle)
    meta = sidecar.read_sidecar(sidecar.engine_path(engines[0], "transformer"))
    installed = {"backend": "tensorrt-rtx", "version": meta["backend_version"]}
    engine = sidecar.engine_path(engines[0], "transformer")
    args = (engine, "transformer", bundle.network("transformer"), installed)
    sidecar.check_loadable(meta, *args, RTX4090, "fix")  # sm89 is a target
    sidecar.check_loadable(meta, *args, RTX5090, "fix")  # so is sm120
    with pytest.raises(UserError, match=r"targets sm89, sm120; this GPU is NVIDIA H200 \(sm90\)"):
        sidecar.check_loadable(meta, *args, H200, "fix")
    # A TensorRT engine is tied to the GPU it was built on.
    dc = dict(meta, backend="tensorrt", targets={"gpu": {"name": "NVIDIA H100", "compute_capability": "sm90"}})
    with pytest.raises(UserError, match=r"built on NVIDIA H100 \(sm90\), this GPU is NVIDIA GeForce RTX 4090"):
        sidecar.check_loadable(dc, engine, "transformer", bundle.network("transformer"),
                               {"backend": "tensorrt", "version": meta["backend_version"]}, RTX4090, "fix")


def test_cli_build_prints_a_table(capsys, engines, fp16_bundle):
    from zimage_trt.cli import main

    assert main(["build", "--bundle", str(fp16_bundle), "--out", str(engines[0]), "--backend", "tensorrt-rtx",
                 "--target", ",".join(TARGETS)]) == 0
    out = capsys.readouterr().out
    assert "transformer   current" in out and "sidecar" in out


def test_cli_build_states_its_host_memory_need_first(capsys, fp16_bundle, tmp_path):
    """Before the first engine is built: the largest engine's need (3x its weights + 3 GiB: one engine at a time)."""
    from zimage_trt.cli import main
    from zimage_trt.runtime.bundle import Bundle

    assert main(["build", "--bundle", str(fp16_bundle), "--out", str(tmp_path / "e"), "--backend", "tensorrt-rtx",
                 "--target", "sm89", "--networks", "vae_decoder"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    need = 3 * Bundle.open(fp16_bundle).network("vae_decoder")["bytes"] + 3 * 2**30
    assert first.startswith(f"build needs about {need / 1e9:.1f} GB of host memory (the vae_decoder; one engine")


# ---------------------------------------------------------------- image sizes: static engines, --sizes, refusals
def test_a_one_size_bundle_keeps_a_static_engine(fp32_bundle, tmp_path):
    out = tmp_path / "static"
    (r,) = build_engines(fp32_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=["sm89"],
                                                         networks=("transformer",)))
    latents = next(i for i in r.meta["io"] if i["name"] == "latents")
    assert "profile" not in latents and latents["shape"] == [1, 16, SIZE // 8, SIZE // 8]
    assert r.meta["image_sizes"] == SizeRange.single(SIZE, SIZE).to_dict()
    with pytest.raises(UserError, match="is for one size .*--sizes needs a bundle exported with --size-range"):
        build_engines(fp32_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=["sm89"], sizes=[(64, 64)]))


def test_sizes_narrow_the_profile_and_make_only_image_engines_stale(engines, fp16_bundle, tmp_path):
    out = copy_tree(engines[0], tmp_path / "engines")
    opts = BuildOptions(backend="tensorrt-rtx", targets=TARGETS, sizes=[(96, 128), (144, 80)])
    results = {r.network: r for r in build_engines(fp16_bundle, out, opts)}
    assert results["text_encoder"].status == "current"  # the same engine for any size
    for name in ("transformer", "vae_decoder"):
        r = results[name]
        assert r.status == "built" and "built for sizes width 64..160" in r.reason
        # The box around the sizes, tuned at the bundle's opt size, which lies inside it.
        assert SizeRange.from_dict(r.meta["image_sizes"]) == SizeRange(80, 128, 96, 144, 128, 128)
        latents = next(i for i in r.meta["io"] if i["name"] == "latents")
        assert latents["profile"] == {"min": [1, 16, 10, 12], "opt": [1, 16, 16, 16], "max": [1, 16, 16, 18]}
    with pytest.raises(UserError, match=r"size 176x176 is outside bundle .*export a bundle with a --size-range"):
        build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS, sizes=[(176, 176)]))


def test_a_size_outside_the_engine_profile_is_refused_with_the_build_command(engines, fp16_bundle, tmp_path):
    out = copy_tree(engines[0], tmp_path / "engines")
    narrow = BuildOptions(backend="tensorrt-rtx", targets=TARGETS, sizes=[(128, 128)], networks=("transformer",))
    build_engines(fp16_bundle, out, narrow)
    meta = sidecar.read_sidecar(sidecar.engine_path(out, "transformer"))
    fix = sidecar.rebuild_command(fp16_bundle, out, "tensorrt-rtx")
    sidecar.check_size(meta, "transformer", 128, 128, fix)  # covered: no error
    with pytest.raises(UserError) as err:
        sidecar.check_size(meta, "transformer", 96, 128, fix)
    message = str(err.value)
    assert message.startswith("size 96x128 is outside the transformer engine's profile (128x128)")
    assert message.endswith(f"zimage-trt build --bundle {fp16_bundle} --out {out} --backend tensorrt-rtx"
                            " --sizes 128x128,96x128")
    # The command it names covers the size: run it, and the new engine takes it.
    build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS, sizes=[(128, 128), (96, 128)],
                                                 networks=("transformer",)))
    sidecar.check_size(sidecar.read_sidecar(sidecar.engine_path(out, "transformer")), "transformer", 96, 128, fix)


# ---------------------------------------------------------------- the version floor and opset 18
def test_tensorrt_older_than_10_15_is_refused_for_opset_23_graphs():
    from zimage_trt.engine.trt_api import check_version

    with pytest.raises(UserError, match=r"tensorrt 10\.13\.0\.35 is installed.*from 10\.15 on.*pip install tensorrt.*--opset 18"):
        check_version("tensorrt", "10.13.0.35", 23)
    check_version("tensorrt", "10.15.1", 23)
    check_version("tensorrt", "11.1.0", 23)
    check_version("tensorrt", "10.8.0", 18)  # opset 18 graphs have no Attention/RMSNormalization to parse
    check_version("tensorrt-rtx", "1.7.1.116", 23)


def test_an_opset_18_bundle_has_plain_ops_matches_diffusers_and_builds(tiny_model, tmp_path):
    """For users on a TensorRT before 10.15: attention and RMSNorm decomposed into plain ops, same results."""
    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.parity import run_parity
    from zimage_trt.sessions import open_sessions

    from .conftest import PROMPT

    prec = {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "fp32"}
    bundle_dir = tmp_path / "opset18"
    # no export check or FP16 calibration (the tiny model needs no scales): the parity below checks every network
    export_bundle(tiny_model, bundle_dir, ExportOptions(height=SIZE, width=SIZE, precision=prec, opset=18,
                                                        check="never", fp16_scales={}))
    for name in ("text_encoder", "transformer", "vae_decoder"):
        model = onnx.load(str(bundle_dir / f"{name}.onnx"), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert model.opset_import[0].version == 18 and not ops & {"Attention", "RMSNormalization"}, name
    bundle = Bundle.open(bundle_dir)
    cpu = torch.device("cpu")
    rows = run_parity(tiny_model, bundle, open_sessions("onnxruntime", bundle, cpu), "onnxruntime", PROMPT, 42, cpu)
    assert all(r.ok for r in rows), [r.cells() for r in rows]
    results = build_engines(bundle_dir, tmp_path / "engines", BuildOptions(backend="tensorrt-rtx", targets=["sm89"]))
    assert [r.status for r in results] == ["built"] * 3


def test_an_rtx_engine_without_user_allocation_is_rebuilt(engines, fp16_bundle, tmp_path):
    out = copy_tree(engines[0], tmp_path / "engines")
    edit_json(sidecar.sidecar_path(sidecar.engine_path(out, "vae_decoder")),
              lambda m: m["build"]["flags"].pop("require_user_allocation"))
    results = {r.network: r for r in build_engines(fp16_bundle, out, BuildOptions(
        backend="tensorrt-rtx", targets=TARGETS, networks=("vae_decoder",)))}
    assert results["vae_decoder"].status == "built" and "REQUIRE_USER_ALLOCATION" in results["vae_decoder"].reason


def test_a_crash_before_the_sidecar_is_written_leaves_no_sidecar_of_another_engine(engines, fp16_bundle, tmp_path,
                                                                                  monkeypatch):
    """The old sidecar goes before the new engine is renamed in: a build killed between the rename and the new
    sidecar leaves an engine without a sidecar (rebuilt next time), never one that a stale sidecar describes."""
    out = copy_tree(engines[0], tmp_path / "engines")
    engine = sidecar.engine_path(out, "vae_decoder")
    old_meta = sidecar.read_sidecar(engine)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what the process meets at that point when it is interrupted

    monkeypatch.setattr(sidecar, "write_sidecar", killed)
    with pytest.raises(KeyboardInterrupt):
        build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS, force=True,
                                                     networks=("vae_decoder",)))
    monkeypatch.undo()
    assert engine.is_file() and sidecar.read_sidecar(engine) is None
    assert not list(out.glob(".*tmp*"))
    (r,) = build_engines(fp16_bundle, out, BuildOptions(backend="tensorrt-rtx", targets=TARGETS,
                                                        networks=("vae_decoder",)))
    assert r.status == "built" and r.reason == "no valid sidecar"
    assert r.meta["onnx_sha256"] == old_meta["onnx_sha256"]


def test_a_refittable_rtx_build_is_refused_where_it_cannot_succeed(capsys, fp32_bundle, tmp_path):
    """Measured with TensorRT-RTX 1.7.1: a refittable build fails without CUDA, and on an H200 for sm89/sm120; so
    it is refused before building, in one line, unless this host's GPU is the one target."""
    from zimage_trt.engine.checks import check_rtx_refit_host

    from .test_user_errors import assert_one_line_error, run_cli

    code, err = run_cli(capsys, "build", "--bundle", str(fp32_bundle), "--out", str(tmp_path / "e"), "--backend",
                        "tensorrt-rtx", "--target", "sm89", "--refittable")
    assert_one_line_error(code, err, "built on a GPU of its one target architecture", "no CUDA GPU", "sm89")
    assert not (tmp_path / "e").exists()
    h200 = {"name": "NVIDIA H200", "cc": (9, 0), "compute_capability": "sm90"}
    rtx4090 = {"name": "NVIDIA GeForce RTX 4090", "cc": (8, 9), "compute_capability": "sm89"}
    with pytest.raises(UserError, match="H200 \\(sm90\\) is not sm89 or sm120"):
        check_rtx_refit_host({"compute_capabilities": ["sm89", "sm120"]}, h200)
    with pytest.raises(UserError, match="is not sm89 or sm120"):
        check_rtx_refit_host({"compute_capabilities": ["sm89", "sm120"]}, rtx4090)  # one target per build
    check_rtx_refit_host({"compute_capabilities": ["sm89"]}, rtx4090)  # the RTX GPU itself: allowed


def test_weight_streaming_builds_ahead_of_time_and_is_part_of_the_request(fp32_bundle, tmp_path):
    """`build --weight-streaming` (strongly typed, TensorRT-RTX on this CPU-only host): the transformer engine is
    built with WEIGHT_STREAMING and says so; toggling it rebuilds the transformer only."""
    out = tmp_path / "ws"
    opts = BuildOptions(backend="tensorrt-rtx", targets=["sm89"], weight_streaming=True)
    results = {r.network: r for r in build_engines(fp32_bundle, out, opts)}
    assert results["transformer"].meta["build"]["flags"]["weight_streaming"] is True
    assert results["transformer"].meta["request"]["weight_streaming"] is True
    # TensorRT-RTX 1.7 refuses WEIGHT_STREAMING with REQUIRE_USER_ALLOCATION: the streamed engine goes without
    # (and its loop runs eagerly); the others keep it, and neither kind is called stale for it
    assert results["transformer"].meta["build"]["flags"]["require_user_allocation"] is False
    assert results["text_encoder"].meta["build"]["flags"]["require_user_allocation"] is True
    assert {r.status for r in build_engines(fp32_bundle, out, opts)} == {"current"}
    assert "weight_streaming" not in results["text_encoder"].meta["build"]["flags"]
    again = {r.network: r.status for r in build_engines(fp32_bundle, out, BuildOptions(backend="tensorrt-rtx",
                                                                                         targets=["sm89"]))}
    assert again == {"text_encoder": "current", "transformer": "built", "vae_decoder": "current"}
