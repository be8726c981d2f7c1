"""onnxruntime on a GPU, as far as a CPU can check it: the provider options and stream as onnxruntime takes them,
the node-placement report on real sessions, the CUDA-graph rules, every one-line refusal, and the FP16 peaks;
then, where PyTorch sees a CUDA GPU and onnxruntime-gpu is installed, the same on real kernels (marked gpu)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.ort_cuda import (CPU_EP, CUDA_EP, SKIP_GRAPH, GraphSlots, gpu_build_missing, graph_refusal,
                                         io_key, missing_kernel, providers_for, require_cuda_provider, run_options,
                                         session_options)
from zimage_trt.runtime.ort_peaks import CPU_NOTE, PeakSession, format_peaks, overflowed
from zimage_trt.runtime.ort_placement import Node, Placement, precision_refusal
from zimage_trt.runtime.ort_session import OrtSession

from .conftest import PROMPT

OPSET = [helper.make_opsetid("", 23)]


def save(tmp_path, nodes, inputs, outputs, inits=(), name="g.onnx"):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=OPSET)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def cpu_session(source):
    options = session_options(ort, cuda=False)
    return ort.InferenceSession(str(source), options, providers=[CPU_EP])


# ------------------------------------------------------------------ provider options, stream, run options
def test_cuda_provider_is_given_the_stream_and_fp32_without_tf32():
    providers = providers_for(torch.device("cuda", 1), 0xBEEF, cuda_graph=True)
    assert providers[1] == CPU_EP
    name, options = providers[0]
    assert name == CUDA_EP
    assert options["device_id"] == "1"
    assert options["has_user_compute_stream"] == "1" and options["user_compute_stream"] == str(0xBEEF)
    assert options["enable_cuda_graph"] == "1" and options["use_tf32"] == "0"
    assert all(isinstance(v, str) for v in options.values())  # onnxruntime takes provider options as strings
    assert providers_for(torch.device("cuda"), 7, cuda_graph=False)[0][1]["enable_cuda_graph"] == "0"
    assert providers_for(torch.device("cpu")) == [CPU_EP]


def test_a_provider_that_does_not_start_is_refused_in_one_line(fp16_bundle):
    """onnxruntime takes the CUDA options, warns and falls back to the CPU where its CUDA provider cannot start
    (here: a CPU-only build); the session refuses that fallback instead of running on the CPU silently."""
    options = session_options(ort, cuda=True)
    with pytest.warns(UserWarning):
        session = ort.InferenceSession(str(Bundle.open(fp16_bundle).onnx_path("vae_decoder")), options,
                                       providers=providers_for(torch.device("cuda"), 12345, False))
    assert session.get_providers() == [CPU_EP]
    with pytest.raises(UserError, match="could not start its CUDA provider") as err:
        require_cuda_provider(session, "vae_decoder")
    assert "\n" not in str(err.value)


def test_run_and_session_options_as_onnxruntime_reads_them():
    gpu = run_options(ort, 7)
    assert gpu.get_run_config_entry("gpu_graph_id") == "7"
    assert gpu.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert run_options(ort, SKIP_GRAPH).get_run_config_entry("gpu_graph_id") == "-1"
    with pytest.raises(RuntimeError):
        run_options(ort, None).get_run_config_entry("gpu_graph_id")
    opts = session_options(ort, cuda=True, external_folder="/weights")
    assert opts.get_session_config_entry("session.record_ep_graph_assignment_info") == "1"
    assert opts.get_session_config_entry("session.use_device_allocator_for_initializers") == "1"
    assert opts.get_session_config_entry("session.model_external_initializers_file_folder_path") == "/weights"


def test_cpu_only_build_is_refused_for_cuda_in_one_line(fp16_bundle):
    assert CUDA_EP not in ort.get_available_providers()  # this machine's build; the GPU tests below run elsewhere
    line = gpu_build_missing(ort)
    assert "CPU-only build" in line and "pip install onnxruntime-gpu" in line and "--device cpu" in line
    path = Bundle.open(fp16_bundle).onnx_path("transformer")
    with pytest.raises(UserError) as err:
        OrtSession("transformer", path, "fp16", torch.device("cuda"))
    assert str(err.value) == line


# ------------------------------------------------------------------ placement report and CUDA-graph rules
def test_placement_report_of_a_real_session(fp16_bundle):
    path = Bundle.open(fp16_bundle).onnx_path("transformer")
    session, model = cpu_session(path), onnx.load(str(path), load_external_data=False)
    here = Placement.of(session, model, CPU_EP)
    assert here.nodes and not here.off_target and not here.copies and here.graph_blockers() == []
    assert here.describe().startswith(f"{len(here.nodes)} nodes on the GPU, 0 compute nodes off it")
    # the same nodes seen from a GPU: every one off it, shape arithmetic told apart from compute
    gpu = Placement.of(session, model, CUDA_EP)
    assert len(gpu.shape_off) + len(gpu.compute_off) == len(gpu.nodes)
    assert {n.op for n in gpu.nodes if n.op == "Shape"} <= {n.op for n in gpu.shape_off}
    assert "MatMul" in {n.op for n in gpu.compute_off} and "MatMul" not in {n.op for n in gpu.shape_off}
    assert "latents" in gpu.inputs_read_off_target()
    blockers = "; ".join(gpu.graph_blockers())
    assert f"{len(gpu.compute_off)} compute nodes off the GPU" in blockers and "read on the host" in blockers


def test_control_flow_and_host_copies_block_cuda_graphs(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["o1"])], "then", [],
                             [helper.make_tensor_value_info("o1", T.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["o2"])], "else", [],
                              [helper.make_tensor_value_info("o2", T.FLOAT, [1])])
    path = save(tmp_path, [helper.make_node("If", ["c"], ["y"], name="if0", then_branch=then, else_branch=other)],
                [helper.make_tensor_value_info("c", T.BOOL, []), helper.make_tensor_value_info("a", T.FLOAT, [1])],
                [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    placement = Placement.of(cpu_session(path), onnx.load(str(path)), CPU_EP)
    assert placement.graph_blockers() == ["control flow (If)"]
    # Memcpy nodes appear only where a CUDA provider runs: the report's arithmetic on what onnxruntime lists
    copies = Placement([Node(CUDA_EP, "m0", "MemcpyToHost"), Node(CUDA_EP, "a0", "Add")], CUDA_EP)
    assert copies.graph_blockers() == ["1 copies between host and GPU"]
    assert copies.describe() == "1 nodes on the GPU, 0 compute nodes off it, 0 shape nodes on the CPU, 1 host copies"


def test_graph_refusal_and_graph_slots():
    text = ("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature as requested by the "
            "user  as all compute graph nodes have not been partitioned to the CUDAExecutionProvider")  # 1.31.1's text
    assert graph_refusal(RuntimeError(text)) == ("onnxruntime refused to record it (as all compute graph nodes have "
                                                 "not been partitioned to the CUDAExecutionProvider)")
    assert graph_refusal(RuntimeError("out of memory")) is None
    released = []
    slots = GraphSlots(limit=2, release=released.append)
    assert [slots.id_for("a"), slots.id_for("b"), slots.id_for("a")] == [1, 2, 1]
    assert slots.id_for("c") == 3 and released == [2]  # "b" was the least recently used
    full = GraphSlots(limit=1)
    assert full.id_for("a") == 1 and full.id_for("b") == SKIP_GRAPH and full.eager_runs == 1


def test_io_key_follows_addresses_and_shapes():
    store = torch.zeros(64)
    a, b = store[:16].view(1, 16), store[:32].view(2, 16)
    assert io_key({"x": a}, {}) == io_key({"x": store[:16].view(1, 16)}, {})
    assert io_key({"x": a}, {}) != io_key({"x": b}, {})  # same address, another shape: another recording
    assert io_key({"x": a}, {}) != io_key({"x": store[16:32].view(1, 16)}, {})


# ------------------------------------------------------------------ precision refusals
def test_fp8_qdq_off_the_gpu_is_refused(tmp_path):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq0")]
    inits = [numpy_helper.from_array(np.array(0.5, np.float16), "s"), helper.make_tensor("zp", T.FLOAT8E4M3FN, [], [0])]
    path = save(tmp_path, nodes, [helper.make_tensor_value_info("x", T.FLOAT16, [2, 3])],
                [helper.make_tensor_value_info("y", T.FLOAT16, [2, 3])], inits)
    session, model = cpu_session(path), onnx.load(str(path))
    assert precision_refusal("transformer", "fp8", Placement.of(session, model, CPU_EP), "1.31.1") is None
    refusal = precision_refusal("transformer", "fp8", Placement.of(session, model, CUDA_EP), "1.31.1")
    assert "float8e4m3fn" in str(refusal) and "--backend tensorrt" in str(refusal) and "2 of them" in str(refusal)


def test_bf16_without_kernels_is_refused_with_the_export_flag(tmp_path):
    conv = save(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], name="conv0")],
                [helper.make_tensor_value_info("x", T.BFLOAT16, [1, 1, 4, 4])],
                [helper.make_tensor_value_info("y", T.BFLOAT16, None)],
                [helper.make_tensor("w", T.BFLOAT16, [1, 1, 1, 1], [1.0])])
    with pytest.raises(Exception) as failed:  # onnxruntime's own NOT_IMPLEMENTED: no bf16 Conv on its CPU
        cpu_session(conv)
    refusal = missing_kernel(failed.value, "vae_decoder", "bf16", ort.__version__)
    assert "BF16 Conv(" in str(refusal) and "--vae-precision fp32" in str(refusal) and "conv0" in str(refusal)
    assert missing_kernel(RuntimeError("disk full"), "vae_decoder", "bf16", "1") is None
    # a bf16 graph whose nodes would fall to the CPU (here: all, seen as from a GPU)
    ident = save(tmp_path, [helper.make_node("Identity", ["x"], ["y"], name="id0")],
                 [helper.make_tensor_value_info("x", T.BFLOAT16, [2])],
                 [helper.make_tensor_value_info("y", T.BFLOAT16, [2])], name="id.onnx")
    placement = Placement.of(cpu_session(ident), onnx.load(str(ident)), CUDA_EP)
    assert "--vae-precision fp32" in str(precision_refusal("vae_decoder", "bf16", placement, "1.31.1"))


# ------------------------------------------------------------------ the CPU session and the FP16 peaks
def test_cpu_session_binds_each_layout_once(fp16_bundle):
    bundle = Bundle.open(fp16_bundle)  # its VAE is fp32
    session = OrtSession("vae_decoder", bundle.onnx_path("vae_decoder"), "fp32", torch.device("cpu"))
    latents = torch.randn(bundle.latent_shape_for(*bundle.sizes.opt))
    image = torch.empty(1, 3, bundle.sizes.opt[1], bundle.sizes.opt[0])
    for _ in range(2):
        session.run({"latents": latents}, {"image": image})
    assert len(session._bindings) == 1 and session.report is None  # no placement report on a CPU
    want = cpu_session(bundle.onnx_path("vae_decoder")).run(None, {"latents": latents.numpy()})[0]
    assert np.array_equal(image.numpy(), want)


def test_run_options_follow_the_recording_state(fp16_bundle):
    """Which gpu_graph_id each run passes: none where the session does not record, -1 (eager) where it records but
    the rules forbid it, one id per layout where it records; one RunOptions per id, made once."""
    session = OrtSession("vae_decoder", Bundle.open(fp16_bundle).onnx_path("vae_decoder"), "fp32", torch.device("cpu"))
    with pytest.raises(RuntimeError):
        session._options_for(("a",)).get_run_config_entry("gpu_graph_id")
    assert session.graph_line() == "CUDA graph: off (eager)"
    session.records, session.graph_note = True, "eager: control flow (If)"
    assert session._options_for(("a",)).get_run_config_entry("gpu_graph_id") == str(SKIP_GRAPH)
    assert session.graph_line() == "CUDA graph: off (eager: control flow (If))"
    session.graphs = GraphSlots()
    ids = [session._options_for(k).get_run_config_entry("gpu_graph_id") for k in (("a",), ("b",), ("a",))]
    assert ids == ["1", "2", "1"] and session._options_for(("b",)) is session._options_for(("b",))
    assert session.graph_line().startswith("CUDA graph: one per input layout")


def scoped(node, block: str):
    """A node as the dynamo exporter marks it inside transformer block `block`."""
    scopes = f"['', 'transformer.{block}', 'transformer.{block}.ff']"
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    return node


def hot_graph(tmp_path):
    """x -> fp16 -> MatMul (block layers.3: 4 * 100 * 300 = 120000 > 65504) -> x 1e-3 (layers.4) -> fp32."""
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=T.FLOAT16, name="cast_in"),
             scoped(helper.make_node("MatMul", ["xh", "w"], ["h"], name="mm"), "layers.3"),
             scoped(helper.make_node("Mul", ["h", "c"], ["hs"], name="mul"), "layers.4"),
             helper.make_node("Cast", ["hs"], ["velocity"], to=T.FLOAT, name="cast_out")]
    inits = [numpy_helper.from_array(np.full((4, 4), 300, np.float16), "w"),
             numpy_helper.from_array(np.array(1e-3, np.float16), "c")]
    return save(tmp_path, nodes, [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                [helper.make_tensor_value_info("velocity", T.FLOAT, [1, 4])], inits, name="hot.onnx")


def test_fp16_peaks_mark_the_block_that_overflows(tmp_path):
    peak = PeakSession(hot_graph(tmp_path), "fp16", torch.device("cpu"))
    assert [p.value for p in peak.probes] == ["xh", "h", "hs"]
    out = torch.empty(1, 4)
    for scale in (1.0, 100.0, 10.0):  # the running maximum keeps the largest run
        peak.run({"x": torch.full((1, 4), scale)}, {"velocity": out})
    rows = {block: (value, probe) for block, value, probe in peak.by_block()}
    assert overflowed(rows["layers.3"][0]) and rows["layers.3"][1].op == "MatMul"
    assert rows["(outside the blocks)"][0] == 100.0 and peak.runs == 3
    table = format_peaks(peak.by_block(), "title")
    assert "OVERFLOW" in table and "MatMul h" in table
    peak.reset()
    assert float(peak.peaks.max()) == 0.0 and peak.runs == 0


def test_fp16_peaks_through_a_whole_loop_on_the_cpu(fp16_bundle):
    from zimage_trt.parity import fp16_peaks
    from zimage_trt.sessions import open_sessions

    bundle = Bundle.open(fp16_bundle)
    sessions = open_sessions("onnxruntime", bundle, torch.device("cpu"))
    text, hot = fp16_peaks(bundle, sessions, PROMPT, 0, "cpu", [bundle.sizes.opt])
    assert hot == [] and "9 passes" in text and "layers.0" in text and CPU_NOTE in text


def test_fp16_peaks_of_a_bundle_that_overflows(fp16_bundle, tmp_path):
    """The patch embedder's weights set to 60000: each image token's features are 60000 x the sum of its 64 noise
    values, past 65504 for any token whose sum passes 1.1 (and everything after it goes non-finite)."""
    from zimage_trt.parity import fp16_peaks
    from zimage_trt.sessions import open_sessions

    hot = tmp_path / "hot"
    shutil.copytree(fp16_bundle, hot)
    model = onnx.load(str(hot / "transformer.onnx"))
    weight = next(i for i in model.graph.initializer if i.name == "transformer.all_x_embedder.2-1.weight")
    weight.CopyFrom(numpy_helper.from_array(np.full(tuple(weight.dims), 60000, np.float16), weight.name))
    onnx.save(model, str(hot / "transformer.onnx"))
    bundle = Bundle.open(hot)
    text, overflowing = fp16_peaks(bundle, open_sessions("onnxruntime", bundle, torch.device("cpu")), PROMPT, 0)
    assert "(outside the blocks) at 128x128" in overflowing and "OVERFLOW" in text


def test_parity_fp16_peaks_needs_onnxruntime(capsys, tiny_model, fp16_bundle):
    from zimage_trt.cli import main

    for extra in (["--backend", "torch"], ["--against", str(fp16_bundle)]):
        code = main(["parity", "--model", str(tiny_model), "--bundle", str(fp16_bundle), "--device", "cpu",
                     "--fp16-peaks", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: --fp16-peaks") and "--backend onnxruntime" in err[-1]


# ------------------------------------------------------------------ on a GPU, with onnxruntime-gpu
gpu = pytest.mark.skipif(not torch.cuda.is_available() or gpu_build_missing(ort) is not None,
                         reason="needs a CUDA GPU and onnxruntime-gpu (scripts/carry_ort_gpu.py)")


def dit_inputs(bundle, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(bundle.latent_shape_for(*bundle.sizes.opt), generator=g)
    cap = torch.randn(1, 32, bundle.caption_dim, generator=g)
    feeds = {"latents": lat, "timestep": torch.tensor([0.3]), "cap_feats": cap, "cap_len": torch.tensor([20])}
    return {k: v.to(device) for k, v in feeds.items()}


@pytest.mark.gpu
@gpu
def test_gpu_session_runs_on_its_stream_without_a_host_wait(fp16_bundle):
    bundle, dev = Bundle.open(fp16_bundle), torch.device("cuda")
    path = bundle.onnx_path("transformer")
    session = OrtSession("transformer", path, "fp16", dev, cuda_graph=False)
    given = session.session.get_provider_options()[CUDA_EP]
    assert given["user_compute_stream"] == str(session.stream.cuda_stream)
    assert not session.placement.compute_off and not session.placement.copies  # must be 0 for the transformer
    feeds, out = dit_inputs(bundle, dev), torch.empty(bundle.latent_shape_for(*bundle.sizes.opt), device=dev)
    session.run(feeds, {"velocity": out})  # warm: lazy initialisation may sync
    # about half a second of GPU time queued ahead of the run: had it waited, that would be done
    assert not waits_for_gpu(session, feeds, out), "the run waited for the GPU (a host sync)"
    cpu = OrtSession("transformer", path, "fp16", torch.device("cpu"))
    want = torch.empty_like(out, device="cpu")
    cpu.run({k: v.cpu() for k, v in feeds.items()}, {"velocity": want})
    assert (out.cpu() - want).abs().max() / want.abs().max() < 2e-2


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_equals_eager(fp16_bundle):
    bundle, dev = Bundle.open(fp16_bundle), torch.device("cuda")
    path = bundle.onnx_path("transformer")
    graph = OrtSession("transformer", path, "fp16", dev, cuda_graph=True)
    eager = OrtSession("transformer", path, "fp16", dev, cuda_graph=False)
    assert graph.graphs is not None, graph.report
    feeds = dit_inputs(bundle, dev)
    a, b = (torch.empty(bundle.latent_shape_for(*bundle.sizes.opt), device=dev) for _ in range(2))
    for t in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):  # past onnxruntime's warm-up: recorded, then replayed
        feeds["timestep"].fill_(t)
        graph.run(feeds, {"velocity": a})
        eager.run(feeds, {"velocity": b})
        torch.cuda.synchronize()
        assert torch.equal(a, b), t
    assert len(graph.graphs.ids) == 1
    print(f"onnxruntime CUDA-graph replay waits for the GPU: {waits_for_gpu(graph, feeds, a)}")  # for the device log


def waits_for_gpu(session, feeds, out) -> bool:
    """Whether a run (a replay, for a recorded layout) returned only after the GPU work queued before it."""
    with torch.cuda.stream(session.stream):
        torch.cuda._sleep(1 << 30)
        queued = torch.cuda.Event()
        queued.record()
        session.run(feeds, {"velocity": out})
    waited = queued.query()
    torch.cuda.synchronize()
    return waited


@pytest.mark.gpu
@gpu
def test_gpu_parity_and_fp16_peaks(tiny_model, fp16_bundle):
    from zimage_trt.parity import fp16_peaks, run_parity
    from zimage_trt.sessions import open_sessions

    bundle, dev = Bundle.open(fp16_bundle), torch.device("cuda")
    sessions = open_sessions("onnxruntime", bundle, dev)
    rows = run_parity(tiny_model, bundle, sessions, "onnxruntime", PROMPT, 0, dev)
    assert all(r.ok for r in rows), [r.cells() for r in rows]
    text, hot = fp16_peaks(bundle, sessions, PROMPT, 0, dev)
    assert hot == [] and "onnxruntime CUDA" in text
