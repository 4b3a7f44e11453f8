"""Mutation check: plant known bugs one at a time and see which tests catch them.

    python tests/mutations.py                 # every mutation (about 10 minutes on 2 CPU cores)
    python tests/mutations.py --list          # names and descriptions only
    python tests/mutations.py topk-ignored non-atomic-write   # some of them

Each mutation is an exact source text replacement in stage_min/ (one or more). For each, the
repository's working tree (tracked and untracked, not ignored, files) is copied to a temporary folder,
the replacement is applied there (a replacement whose text is not found exactly once is reported as
STALE: the code moved, update the mutation), and the mutation's test files are run there with pytest
(PYTHONPATH = the copy, so subprocesses import the mutated code too). First the same test files run
on the unmutated copy: they must pass, or nothing below means anything.

A mutation is CAUGHT when at least one test fails; the table names the failing tests. The exit status
is 0 when every mutation is caught, 1 otherwise. Not run by CI (it is slow); its latest result is in
docs/testing.md. Not collected by pytest (no test_ prefix).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    description: str
    file: str  # relative to the repository root
    edits: list  # [(exact old text, new text)], each old text must occur exactly once
    tests: list  # pytest arguments: files or node ids


MUTATIONS = [
    Mutation(
        "hf-norm-swap", "transformers key table: norm_self <-> norm_ffn (self_attn_layer_norm and final_layer_norm swapped)",
        "stage_min/io/loading.py",
        [('[("norm_self", "self_attn_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"), ("norm_ffn", "final_layer_norm")]',
          '[("norm_self", "final_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"), ("norm_ffn", "self_attn_layer_norm")]')],
        ["tests/test_musicgen.py", "tests/test_loading.py"],
    ),
    Mutation(
        "audiocraft-norm-swap", "audiocraft key table: norm1 <-> norm2",
        "stage_min/io/formats.py",
        [('("norm_self", "norm1")', '("norm_self", "norm2")'), ('("norm_ffn", "norm2")', '("norm_ffn", "norm1")')],
        ["tests/test_formats.py::test_audiocraft_layout_matches_transformers"],
    ),
    Mutation(
        "stage-norm-swap", "official STAGE key table: norm_self <-> norm_ffn",
        "stage_min/io/formats.py",
        [('[("norm_self", sa), ("norm_cross", ca), ("norm_ffn", ff)]', '[("norm_self", ff), ("norm_cross", ca), ("norm_ffn", sa)]')],
        ["tests/test_formats.py::test_stage_checkpoint_matches_x_transformers"],
    ),
    Mutation(
        "hf-proj-bias-dropped", "transformers loading: enc_to_dec_proj.bias read as zeros (the init's value)",
        "stage_min/io/loading.py",
        [('    ours = gather(lm_part, hf_lm_key_table(cfg), "LM weights")\n',
          '    ours = gather(lm_part, hf_lm_key_table(cfg), "LM weights")\n    ours["text_proj.bias"] = torch.zeros_like(ours["text_proj.bias"])\n')],
        ["tests/test_musicgen.py"],
    ),
    Mutation(
        "topk-ignored", "sampling: the top-k filter is never applied",
        "stage_min/generate.py", [("    if sc.top_k > 0:\n", "    if False:\n")],
        ["tests/test_sampling.py"],
    ),
    Mutation(
        "topp-ignored", "sampling: the top-p filter is never applied",
        "stage_min/generate.py", [("    if 0 < sc.top_p < 1:\n", "    if False:\n")],
        ["tests/test_sampling.py"],
    ),
    Mutation(
        "temperature-ignored", "sampling: logits not divided by the temperature",
        "stage_min/generate.py",
        [("logits = (logits - logits.amax(-1, keepdim=True)) / max(sc.temperature, MIN_TEMPERATURE)",
          "logits = (logits - logits.amax(-1, keepdim=True))")],
        ["tests/test_sampling.py"],
    ),
    Mutation(
        "guidance-formula", "guidance: uncond + (cond - uncond) * cfg written as cond * cfg - uncond",
        "stage_min/generate.py",
        [("    return uncond + (cond - uncond) * cfg_coef\n", "    return cond * cfg_coef - uncond\n")],
        ["tests/test_sampling.py", "tests/test_fast.py::test_top_k_1_is_greedy_on_guided_logits"],
    ),
    Mutation(
        "loss-counts-context", "batch builder: the loss mask also covers the context frames' codes",
        "stage_min/train/training.py",
        [('return {"grid": seq.grid, "keep": seq.keep, "target": seq.target,',
          'return {"grid": seq.grid, "keep": seq.keep, "target": seq.target | (seq.keep[:, None, :] & (seq.grid < lm_cfg.card)),')],
        ["tests/test_loss_and_saves.py"],
    ),
    Mutation(
        "non-atomic-write", "write_atomic writes straight to the final path",
        "stage_min/io/loading.py",
        [("        write(tmp)\n        with_default_mode(tmp)\n        os.replace(tmp, path)\n", "        write(path)\n")],
        ["tests/test_loss_and_saves.py"],
    ),
    Mutation(
        "checkpoint-in-place", "save_checkpoint writes step-N/ in place (no temporary folder; `latest` still switches last)",
        "stage_min/train/training.py",
        [('write_step(out, name, Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out)), ',
          'write_step(out, name, (out / name).mkdir(exist_ok=True) or out / name, '),
         ("        if (out / name).exists():  # a complete folder of a run killed before its pointer switch\n"
          "            shutil.rmtree(out / name)\n        os.rename(tmp, out / name)\n", "        pass\n")],
        ["tests/test_loss_and_saves.py"],
    ),
]


def copy_tree(dst: Path):
    """The working tree as it is: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def apply(folder: Path, m: Mutation) -> str | None:
    """Apply the edits; the problem (stale text) or None."""
    path = folder / m.file
    text = path.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            return f"{m.file}: the text to replace occurs {n} times: {old.strip()[:70]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def run_tests(folder: Path, tests: list, timeout: int) -> tuple[int, list, str]:
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                           cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], "timed out"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, flags=re.M)
    summary = next((line for line in reversed(r.stdout.splitlines()) if line.strip()), "")
    return r.returncode, failed, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:24s} {m.description}  [{' '.join(m.tests)}]")
        return 0
    unknown = [n for n in args.names if n not in {m.name for m in MUTATIONS}]
    if unknown:
        p.error(f"unknown mutation {unknown[0]}; see --list")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="stage-min-mutations-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        tests = sorted({t for m in chosen for t in m.tests})
        code, failed, summary = run_tests(clean, tests, args.timeout)
        print(f"baseline (no mutation): {summary}", flush=True)
        if code != 0:
            print(f"error: the selected tests fail without any mutation: {failed}", file=sys.stderr)
            return 2
        rows = []
        for m in chosen:
            folder = Path(tmp) / m.name
            shutil.copytree(clean, folder)
            t0 = time.time()
            problem = apply(folder, m)
            if problem:
                status, caught_by = "STALE", problem
            else:
                code, failed, summary = run_tests(folder, m.tests, args.timeout)
                status = "caught" if code != 0 else "MISSED"
                counts = Counter(re.sub(r"\[.*\]$", "", f) for f in failed)  # parametrized cases folded
                caught_by = ", ".join(f"{n} ({c})" if c > 1 else n for n, c in counts.items()) or summary
            rows.append((m, status, caught_by))
            print(f"{m.name}: {status} ({time.time() - t0:.0f} s) {caught_by}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    print("\n| mutation | file | result | tests that failed (how many cases) |\n|---|---|---|---|")
    for m, status, caught_by in rows:
        print(f"| `{m.name}`: {m.description} | {m.file} | {status} | {caught_by} |")
    print(f"\n{sum(s == 'caught' for _, s, _ in rows)}/{len(rows)} caught in {time.time() - start:.0f} s")
    return 0 if all(s == "caught" for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
