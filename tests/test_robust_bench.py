"""scripts/bench_pipeline.py on its tiny shape: build to saved, with the stage breakdown."""
import importlib.util
import json

from conftest import REPO


def test_bench_pipeline_tiny_shape_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pipeline",
                                                  REPO / "scripts" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--shape", "tiny", "--device", "cpu", "--layers", "1", "--nsamples", "2",
                         "--seqlen", "32", "--dtype", "float32", "--out", str(tmp_path)])
    stages = report["stages_s"]
    assert {"build_s", "capture_s", "hessian_s", "quantize_s", "propagate_s", "store_s",
            "save_s"} <= set(stages) and all(v >= 0 for v in stages.values())
    assert report["total_s"] >= sum(stages.values()) * 0.99
    assert 1 < report["bits"]["paper"] < 2
    assert (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "layers" / "layer_0000.safetensors").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["quant"] == "hbllm_row"
