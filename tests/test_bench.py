"""The benches that must not rot: bench/memory.py's arithmetic and bench/gpu_smoke.py at toy shapes on CPU."""
import importlib.util
import json
from pathlib import Path

import pytest

import models

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


memory = _load("memory")


def test_memory_plan_of_the_4b_recipe_matches_a_hand_computation(capsys):
    out = memory.main(["--config", str(ROOT / "configs/userrl-qwen3-4b.json"), "--gpus", "8"])
    text = capsys.readouterr().out
    assert json.loads(text.strip().splitlines()[-1]) == out
    assert out["params_b"] == 4.022 and out["gpus"] == 8
    assert set(out["peak_gb"]) == {"startup", "rollout", "logprob", "update", "total"}
    assert out["peak_gb"]["total"] == max(v for k, v in out["peak_gb"].items() if k != "total")
    # the KV cache by hand: 128 tasks / 8 GPUs = 16 per rank, rolled out 4 at a time x group 8 = 32 episodes;
    # 1,152 prompt + 8,192 episode tokens; K and V x 36 layers x 8 KV heads x 128 x 2 bytes (bf16)
    kv = 32 * (1152 + 8192) * (2 * 36 * 8 * 128 * 2) / 2 ** 30
    line = next(ln for ln in text.splitlines() if ln.startswith("KV cache bf16: 32 x 9,344 tokens x 147,456 B"))
    cells = line.split()[-6:]                     # startup rollout logprob loss backward step
    assert cells[0] == "-" and float(cells[1]) == pytest.approx(kv, abs=0.005) and cells[2:] == ["-"] * 4
    # sharded AdamW moments: 2 x 4 bytes x 4,022,468,096 parameters / 8 GPUs, in every phase but start-up
    line = next(ln for ln in text.splitlines() if ln.startswith("AdamW moments fp32, sharded 1/8"))
    assert [float(c) for c in line.split()[-5:]] == [pytest.approx(8 * 4_022_468_096 / 8 / 2 ** 30, abs=0.005)] * 5


def test_memory_plan_counts_no_full_model_or_gradient_copy_on_the_gpu(capsys):
    """What train.py no longer holds: the full fp32 model before fully_shard, an fp32 deepcopy for the rollout
    copy, unsharded gradients accumulated without sync, a flat all-reduce copy, AdamW foreach temporaries."""
    out = memory.main(["--config", str(ROOT / "configs/userrl-qwen3-8b.json"), "--gpus", "8"])
    text = capsys.readouterr().out
    for gone in ("before fully_shard", "deepcopy", "no-sync", "flat all-reduce", "foreach"):
        assert gone not in text, gone
    # start-up by hand: the bf16 rollout copy, this rank's fp32 shard, the root group (embeddings and the untied
    # lm_head, larger than a block) in full fp32 while fully_shard moves it, 1 GB of context
    s = memory.load_shape("Qwen/Qwen3-8B")
    root = 2 * 151_936 * 4_096 + 4_096
    assert s.root_params == root > s.block_params
    assert out["peak_gb"]["startup"] == pytest.approx((2 * s.params + 4 * s.params / 8 + 4 * root) / 2 ** 30 + 1,
                                                      abs=0.006)
    assert out["fits"] and f"8 x {(6 * s.params) / 2 ** 30:.1f} = " in text  # host: fp32 model + bf16 cast per rank


def test_memory_shape_from_a_local_folder_and_a_clear_error_otherwise(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    s = memory.load_shape(str(tmp_path))
    assert s.params == sum(p.numel() for p in model.parameters()) and s.tied and s.vocab == len(tok)
    assert s.root_params == model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()
    with pytest.raises(SystemExit, match="not in bench/shapes.py's table .known: Qwen3-0.6B"):
        memory.load_shape("nobody/NoSuchModel")
    # the demo's own model, as the docstring's example plans it
    demo, _ = models.load_model("tiny-demo")
    assert memory.load_shape("tiny-demo").params == sum(p.numel() for p in demo.parameters())
    assert "startup" in memory.main(["--config", str(ROOT / "configs/demo.json"), "--gpus", "1", "--quick"])["peak_gb"]


def test_gpu_smoke_quick_runs_every_part_on_cpu(capsys):
    """The GPU smoke test's own code at toy shapes, so it cannot rot while no GPU runs it."""
    smoke = _load("gpu_smoke")
    out = smoke.main(["--quick", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert smoke.errors(out) == [], smoke.errors(out)
    assert smoke.errors({"a": {"error": "x", "c": {"error": "y"}}, "b": {}}) == [".a: x", ".a.c: y"]
    loss = out["loss"]
    assert loss["fp32_out_matmuls"] == {"mm": False, "addmm": False}          # the CPU has no such kernels
    assert set(loss["fused"]) == {"0.25", "1", "4"} and loss["best_chunk_mb"] in (0.25, 1.0, 4.0)
    for r in loss["fused"].values():
        assert r["loss_diff_vs_naive"] < 1e-4 and r["grad_rel_err_hidden"] < 0.01 and r["grad_rel_err_weight"] < 0.01
    gap = out["rollout"]["logprob_gap"]
    assert gap["rollout_copy"]["max_abs_beyond_2000"] < gap["old_deepcopy_to_bf16"]["max_abs_beyond_2000"]
    assert gap["rollout_copy_bf16_head"] == gap["rollout_copy"]  # the CPU has no fp32-output matmul: same logits
    decode = out["rollout"]["decode"]
    assert set(decode) == {"schedule=lockstep", "schedule=engine", "schedule=engine+compile"}
    assert "CUDA only" in decode.pop("schedule=engine+compile")["skipped"]
    assert all(r["episodes"] == 32 and r["tokens_per_s"] > 0 for r in decode.values()), decode
    steps = out["train"]["steps"]
    assert len(steps) == 2 and all(s["time_update"] > 0 and "peak_mem_gb" in s for s in steps)
