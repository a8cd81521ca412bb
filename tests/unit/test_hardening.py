"""Issue 21's classes of bad and hostile input, each through the CLI where a user meets it:
exit 2, one stderr line, no traceback, nothing left in --out."""

from __future__ import annotations

import fcntl
import json
import os
import pickle

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file

from clamp_export import pipeline
from clamp_export.data.sources import noise_images
from clamp_export.errors import UserError
from clamp_export.export.lint import lint
from clamp_export.models import registry
from clamp_export.models.preprocess import Preprocess
from clamp_export.quant.bits import BitsSpec
from clamp_export.quant.calibrate import calibrate
from clamp_export.quant.fakequant import collect_qparams, wrap_model
from clamp_export.quant.qparams import QParams
from clamp_export.quant.targets import get_profile
from clamp_export.runtime import backends
from tests.conftest import TINY, make_tiny, requires_fmnist
from tests.unit.test_cli_errors import assert_clean_error, assert_nothing_written, run_cli

PRE = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, input_size=(3, 16, 16))
NOISE = ("--calib", "noise", "--no-engine")


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_qparams(path, target: str = "ort", bits: str = "w8a8") -> dict:
    qm = calibrate(
        wrap_model(make_tiny(), BitsSpec.parse(bits), get_profile(target)), noise_images(8, PRE)
    )
    qp = collect_qparams(qm, model="vit_tiny_patch16_224", target=target, bits=bits)
    qp.save(path)
    return json.loads(path.read_text())


# -- security --------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["zip", "plain"])
def test_planted_pickle_checkpoint_is_refused_before_stage1_and_never_runs(
    tiny_weights, tmp_path, flavour
):
    _, args = tiny_weights
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    payload = {"identity": _Payload(marker), "next": 0}
    if flavour == "zip":
        torch.save(payload, out / "search.ckpt")
    else:
        (out / "search.ckpt").write_bytes(pickle.dumps(payload))
    proc = run_cli(*args, "--resume", "--out", str(out), "--cache-dir", str(tmp_path / "c"))
    assert_clean_error(proc, "not a clamp-export checkpoint", "without --resume")
    assert not (tmp_path / "c").exists()  # refused before Stage 1
    assert not marker.exists()
    assert [p.name for p in out.iterdir()] == ["search.ckpt"]  # left as it was


@pytest.mark.parametrize("flavour", ["zip", "plain"])
def test_pickled_weights_get_our_one_line_not_torchs_unsafe_advice(tmp_path, flavour):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pth"
    payload = {"model": _Payload(marker)}
    if flavour == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    proc = run_cli("fmnist_vit", "--weights", str(path), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "refusing to load", "could run code", ".safetensors")
    assert "weights_only" not in proc.stderr and not marker.exists()
    assert_nothing_written(tmp_path / "o")


# -- documented features that crashed -----------------------------------------------------------


@pytest.mark.parametrize("flags", [("--bits", "mp:4.7"), ("--budget-mb", "0.02")])
def test_mixed_precision_without_a_search_exports_lints_and_agrees(tiny_weights, tmp_path, flags):
    _, args = tiny_weights
    out = tmp_path / "o"
    proc = run_cli(
        *args, *flags, "--calib", "noise", "--target", "trt", "--no-engine", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backends"]["ort-qdq"]["agreement"] >= 0.995
    mixed = report["mixed_precision"]
    assert mixed["avg_weight_bits"] <= (4.7 if flags[0] == "--bits" else 8) + 1e-9
    assert min(mixed["weight_bits"].values()) < 8
    assert lint(onnx.load(str(out / "model.qdq.onnx")), get_profile("trt")) == []


def test_budget_with_fixed_bits_is_refused(tiny_weights, tmp_path):
    _, args = tiny_weights
    proc = run_cli(
        *args, "--bits", "w4a4", "--budget-mb", "5", *NOISE, "--out", str(tmp_path / "o")
    )
    assert_clean_error(proc, "contradicts --bits w4a4", "mp:W")
    assert_nothing_written(tmp_path / "o")


# -- options that crashed --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--num-classes", "0"), "--num-classes must be an integer of at least 1"),
        (("--img-size", "0"), "--img-size must be an integer of at least 1"),
        (("--in-chans", "3"), "input channels 1 vs 3"),
        (("--percentile", "40", "--range", "percentile"), "(50, 100]"),
        (("--percentile", "nan", "--range", "percentile"), "(50, 100]"),
        (("--mean", "nan"), "--mean nan is not finite"),
        (("--std", "0"), "--std 0.0 must be positive"),
        (("--std", "-0.3"), "must be positive"),
        (("--out", ""), "empty path"),
        (("--calib-size", "100000"), "at most 10000"),
        (("--resume",), "--resume continues a CLAMP search"),
    ],
)
def test_bad_options_on_the_reference_model(tmp_path, flags, needle):
    out = ("--out", str(tmp_path / "o"))  # a later --out "" wins
    proc = run_cli("fmnist_vit", *NOISE, *out, *flags, "--cache-dir", str(tmp_path / "cache"))
    assert_clean_error(proc, needle)
    assert_nothing_written(tmp_path / "o")
    assert not (tmp_path / "cache").exists()


def test_cache_dir_that_is_a_file_or_cannot_be_created(tiny_weights, tmp_path):
    _, args = tiny_weights
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cache in (blocker, blocker / "sub"):
        proc = run_cli(
            *args, "--calib", "clamp-synth", "--cache-dir", str(cache), "--out", str(tmp_path / "o")
        )
        assert_clean_error(proc, "--cache-dir", "is not a directory")
    proc = run_cli("synth", *args, "--cache-dir", str(blocker), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, "--cache-dir")
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("flag", ["--lr", "--tau"])
def test_nan_optimizer_settings(tiny_weights, tmp_path, flag):
    _, args = tiny_weights
    proc = run_cli("synth", *args, flag, "nan", "--out", str(tmp_path / "o"))
    assert_clean_error(proc, f"synth {flag[2:]} must be a finite number, got nan")
    assert_nothing_written(tmp_path / "o")


# -- data that crashed -----------------------------------------------------------------------


def _tensor_file(path, images, labels=None):
    save_file({"images": images} | ({"labels": labels} if labels is not None else {}), str(path))
    return path


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("truncated-idx", "is truncated"),
        ("count-mismatch", "holds 8 images but 5 labels"),
        ("no-images", "holds no images"),
        ("uint8-pixels", "finite floats in [0, 1]"),
        ("labels-beyond-classes", "labels of"),
    ],
)
def test_bad_eval_data_is_refused_before_anything_is_written(
    tiny_weights, tmp_path, content, needle
):
    _, args = tiny_weights
    x = torch.rand(8, 3, 16, 16)
    if content == "truncated-idx":
        source = tmp_path / "idx"
        source.mkdir()
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (source / name).write_bytes(b"\x00\x00\x08\x03\x00\x00")  # 3 dims named, 0.5 given
    elif content == "count-mismatch":
        source = _tensor_file(tmp_path / "d.safetensors", x, torch.zeros(5, dtype=torch.int64))
    elif content == "no-images":
        source = _tensor_file(tmp_path / "d.safetensors", x[:0])
    elif content == "uint8-pixels":
        source = _tensor_file(tmp_path / "d.safetensors", (x * 255).to(torch.uint8))
    else:
        source = _tensor_file(tmp_path / "d.safetensors", x, torch.full((8,), 7, dtype=torch.int64))
    proc = run_cli(*args, *NOISE, "--eval-data", str(source), "--out", str(tmp_path / "o"))
    assert_clean_error(proc, needle)
    assert_nothing_written(tmp_path / "o")


def test_calib_size_beyond_the_source_is_refused(tiny_weights, tmp_path):
    _, args = tiny_weights
    source = _tensor_file(tmp_path / "d.safetensors", torch.rand(10, 3, 16, 16))
    proc = run_cli(
        *args,
        "--calib",
        "real",
        "--calib-data",
        str(source),
        "--calib-size",
        "32",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(proc, "--calib-size 32 but", "holds only 10 images")
    assert_nothing_written(tmp_path / "o")


# -- qparams.json of the wrong shape or values -------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: [d], "top level is a JSON list"),
        (lambda d: "w8a8", "top level is a JSON str"),
        (lambda d: b"\x89PNG\r\n\x1a\n\xff\xfe", "cannot read qparams file"),
        (lambda d: _set(d, "blocks.0.mlp.fc1", "input", scale=["big"]), "is not of type 'number'"),
        (
            lambda d: _set(d, "blocks.0.mlp.fc1", "input", zero_point=[3.5]),
            "is not of type 'integer'",
        ),
        (
            lambda d: _set(d, "blocks.0.attn.qkv", "weight", scale=[0.1] * 3, zero_point=[0] * 3),
            "the layer needs 96",
        ),
        (lambda d: _set(d, "blocks.0.mlp.fc1", "weight", bits=4), "4-bit levels in a w8a8 file"),
    ],
)
def test_qparams_of_the_wrong_shape(tiny_weights, tmp_path, mutate, needle):
    _, args = tiny_weights
    qp = tmp_path / "qparams.json"
    new = mutate(_tiny_qparams(qp))
    qp.write_bytes(new) if isinstance(new, bytes) else qp.write_text(json.dumps(new))
    proc = run_cli(*args, "--qparams", str(qp), "--no-engine", "--out", str(tmp_path / "o"))
    assert_clean_error(proc, needle)
    assert_nothing_written(tmp_path / "o")


def _set(d: dict, module: str, role: str, **values) -> dict:
    d["modules"][module][role].update(values)
    return d


@pytest.mark.parametrize("scale", [1e-45, 1e6])
def test_fp16_graph_refuses_scales_it_cannot_hold_through_the_cli(tiny_weights, tmp_path, scale):
    _, args = tiny_weights
    d = _tiny_qparams(tmp_path / "q.json", target="trt")
    d["modules"]["blocks.1.mlp.fc2"]["input"]["scale"] = [scale]
    (tmp_path / "q.json").write_text(json.dumps(d))
    proc = run_cli(
        *args,
        "--target",
        "trt",
        "--qparams",
        str(tmp_path / "q.json"),
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_error(proc, "violate target 'trt'", "does not fit the float16 graph")
    assert_nothing_written(tmp_path / "o")


@pytest.mark.parametrize("scale", [1e-45, 1e6])
def test_fp16_graph_refuses_scales_it_cannot_hold(tmp_path, scale):
    for target in ("trt", "ort"):
        d = _tiny_qparams(tmp_path / "q.json", target=target)
        d["modules"]["blocks.1.mlp.fc2"]["input"]["scale"] = [scale]
        qp = QParams.from_dict(d)
        if target == "ort":
            qp.validate(get_profile("ort"))  # an FP32 graph holds it
            continue
        with pytest.raises(
            UserError, match=r"blocks.1.mlp.fc2:input: scale .* does not fit the float16"
        ):
            qp.validate(get_profile("trt"))


def test_integral_float_zero_points_read_as_integers(tmp_path):
    d = _tiny_qparams(tmp_path / "q.json")
    d["modules"]["blocks.0.mlp.fc1"]["input"]["zero_point"] = [3.0]
    assert QParams.from_dict(d).modules["blocks.0.mlp.fc1"]["input"].zero_point == [3]


# -- weights accepted in silence ---------------------------------------------------------------


def _fmnist_state(**changes) -> dict:
    spec = registry.ALIASES["fmnist_vit"]
    model = registry.create(spec, pretrained=False, model_kwargs=changes)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda: (
                _fmnist_state() | {"blocks.2.mlp.fc1.weight": torch.full((256, 128), float("nan"))}
            ),
            "blocks.2.mlp.fc1.weight holds 32768 NaN/Inf",
        ),
        (
            lambda: {
                k: v.to(torch.int8) if v.dim() == 2 else v for k, v in _fmnist_state().items()
            },
            "is int8, but the model needs floating-point",
        ),
        (
            lambda: {
                k: v.contiguous() for k, v in make_tiny(num_classes=1000).state_dict().items()
            },
            "another architecture",
        ),
        (lambda: _fmnist_state(img_size=32), "pass --img-size 32"),
    ],
)
def test_weights_that_were_accepted_in_silence(tmp_path, make, needle):
    path = tmp_path / "w.safetensors"
    save_file(make(), str(path))
    proc = run_cli("fmnist_vit", "--weights", str(path), *NOISE, "--out", str(tmp_path / "o"))
    assert_clean_error(proc, needle)
    assert "--num-classes" not in proc.stderr  # the architecture is compared before the classes
    assert_nothing_written(tmp_path / "o")


@requires_fmnist
def test_asked_for_resampling_is_said_and_recorded(tmp_path):
    out = tmp_path / "o"
    proc = run_cli("fmnist_vit", "--img-size", "32", *NOISE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "warning: resampled the position embeddings" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("from a 7x7 to a 8x8 patch grid" in n for n in report["notes"])
    assert json.loads((out / "qparams.json").read_text())["metadata"]["preprocess"][
        "input_size"
    ] == [1, 32, 32]


# -- lint and head layouts -----------------------------------------------------------------------


def _graph(nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_lint_refuses_a_float_graph_and_tells_pooling_from_layernorm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])
    pool = _graph([helper.make_node("ReduceMean", ["x"], ["y"], name="pool", keepdims=0)], [x], [y])
    assert [(v.node, v.rule) for v in lint(pool, get_profile("trt"))] == [("g", "quantized")]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 4, 8])
    ln = _graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], name="ln_mean"),
            helper.make_node("Sub", ["x", "m"], ["z"], name="ln_centre"),
        ],
        [x],
        [z],
    )
    assert {v.rule for v in lint(ln, get_profile("trt"))} == {"single-layernorm", "quantized"}


def test_lint_cli_says_a_float_graph_is_not_a_deployment(tmp_path):
    model = make_tiny()
    path = tmp_path / "fp32.onnx"
    torch.onnx.export(
        model, (torch.randn(1, 3, 16, 16),), str(path), opset_version=17, dynamo=False
    )
    proc = run_cli("lint", str(path), "--target", "ort")
    assert proc.returncode == 1
    assert "[quantized] no QuantizeLinear/DequantizeLinear" in proc.stdout


def test_pooled_head_without_class_token_is_supported(tmp_path):
    model = make_tiny(class_token=False, global_pool="avg")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    args = [
        "vit_tiny_patch16_224",
        "--weights",
        str(path),
        "--img-size",
        "16",
        "--num-classes",
        "5",
    ]
    args += [
        f"--model-arg={k}={v}" for k, v in TINY.items() if k not in ("img_size", "num_classes")
    ]
    args += ["--model-arg", "class_token=False", "--model-arg", "global_pool='avg'"]
    out = tmp_path / "o"
    proc = run_cli(*args, "--target", "trt", *NOISE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["backends"]["ort-qdq"]["agreement"] >= 0.99
    assert lint(onnx.load(str(out / "model.qdq.onnx")), get_profile("trt")) == []
    proc = run_cli(
        *args[:-4], "--model-arg", "global_pool='map'", *NOISE, "--out", str(tmp_path / "m")
    )
    assert_clean_error(proc, "global_pool='map' is not supported", "'token', 'avg'")
    assert_nothing_written(tmp_path / "m")


# -- run directories -------------------------------------------------------------------------


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_later_run_replaces_every_file_of_the_earlier_one(tiny_weights, tmp_path):
    _, args = tiny_weights
    out = tmp_path / "o"
    first = run_cli(*args, "--target", "trt", "--calib", "noise", "--out", str(out))
    assert first.returncode == 0, first.stderr
    trt_files = set(_files(out))
    assert "qparams.json" in trt_files and "manifest.json" in trt_files
    second = run_cli(*args, "--target", "ort", *NOISE, "--out", str(out))
    assert second.returncode == 0, second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(_files(out)) == set(manifest["files"]) | {"manifest.json"}
    assert "model.engine" not in _files(out)
    assert json.loads((out / "report.json").read_text())["target"] == "ort"


def test_a_run_that_fails_after_export_leaves_the_previous_run_whole(
    tiny_weights, tmp_path, monkeypatch
):
    path, _ = tiny_weights
    out = tmp_path / "o"
    cfg = pipeline.RunConfig(
        "vit_tiny_patch16_224",
        weights=str(path),
        num_classes=TINY["num_classes"],
        img_size=TINY["img_size"],
        model_args={k: v for k, v in TINY.items() if k not in ("img_size", "num_classes")},
        calib="noise",
        out=str(out),
        cache_dir=None,
    )
    pipeline.run(cfg, log=lambda m: None)
    before = _files(out)

    def broken(*a, **k):
        raise RuntimeError("the parity backend died")

    monkeypatch.setattr(backends, "OrtRunner", broken)
    with pytest.raises(RuntimeError, match="backend died"):
        pipeline.run(pipeline.RunConfig(**{**cfg.__dict__, "bits": "w4a8"}), log=lambda m: None)
    assert _files(out) == before  # same names, same bytes, no staging folder left


def test_a_second_run_into_a_busy_directory_is_refused(tiny_weights, tmp_path):
    _, args = tiny_weights
    out = tmp_path / "o"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = run_cli(*args, *NOISE, "--out", str(out))
    finally:
        os.close(fd)
    assert_clean_error(proc, "another clamp-export run is writing to")
    assert_nothing_written(out)


def test_resume_with_nothing_to_resume_is_refused_before_stage1(tiny_weights, tmp_path):
    _, args = tiny_weights
    proc = run_cli(
        *args, "--resume", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")
    )
    assert_clean_error(proc, "nothing to resume")
    assert not (tmp_path / "c").exists()  # Stage 1 never ran
    assert_nothing_written(tmp_path / "o")
