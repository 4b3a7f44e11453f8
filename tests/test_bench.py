"""bench.py's comparison modes run end to end at toy sizes and compare like with like (no timings asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "weights" / "stage-toy"


def bench(*argv) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), *argv, "--threads", "1", "--repeats", "1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_train_mode_runs_both_sides_on_the_same_weights():
    (out,) = bench("--mode", "train", "--config", "tiny", "--batch", "1", "--frames", "20", "--no-compile")
    assert out["same_first_loss"] is True  # ours and transformers' MusicgenForCausalLM compute the same loss
    assert out["ours_params_m"] == out["hf_params_m"] > 0
    assert out["ours_step_s"] > 0 and out["hf_step_s"] > 0 and out["speedup"] > 0
    assert out["ours_peak_mem_mb"] >= 0 and "memory_ratio" in out
    # the LoRA and checkpointing rows: the same first loss (B starts at zero; recomputing changes nothing),
    # fewer trained parameters, and their speed and memory against full fine-tuning on the same shape
    assert out["ours_lora_params_m"] < out["ours_params_m"] == out["ours_ckpt_params_m"]
    for v in ("ours_lora", "ours_ckpt", "ours_lora_ckpt"):
        assert out[f"{v}_speed_vs_full"] > 0 and out[f"{v}_memory_vs_full"] >= 0


def test_stage_mode_estimates_the_original_loop_from_timed_steps():
    rows = bench("--mode", "stage", "--config", "tiny", "--context-seconds", "0.4", "--stem-seconds", "0.2,0.4",
                 "--no-compile", "--original-full")
    assert [r["stem_s"] for r in rows] == [0.2, 0.4]
    assert [r["sampling_steps"] for r in rows] == [10 + 4 - 1, 20 + 4 - 1]  # frames + K - 1 steps to sample
    for r in rows:
        assert r["ours_s"] > 0 and r["original_s"] > 0
        # the estimate from a few timed steps lands near the whole loop's time
        assert 0.3 < r["original_s_estimated"] / r["original_s"] < 3


@pytest.mark.skipif(not (TOY / "config.json").exists(), reason="weights/stage-toy is not built")
def test_song_f1_mode_scores_the_toy_per_10_s_and_the_real_drums_as_a_ceiling():
    (out,) = bench("--mode", "song-f1", "--model", str(TOY), "--songs", "1", "--seconds", "14")
    assert out["style"] == "toy" and out["songs"] == 1
    assert len(out["f1_per_10s_of_whole"]) == 2  # 0-10 s and 10-14 s
    assert all(0 <= f <= 1 for f in [out["f1_whole"], out["f1_first_10s"], *out["f1_per_10s_of_whole"]])
    # the song's own drum stem, through the same tracking and scoring, finds the song's beats
    assert out["f1_reference"] >= 0.9
    assert isinstance(out["later_10s_not_below_first_by_0.05"], bool)
