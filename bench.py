"""Decoding speed: ours (eager and torch.compile) against transformers' MusicGen, same random weights.

    python bench.py --config tiny
    python bench.py --config small --steps 64
    python bench.py --config small --dtype bfloat16
    python bench.py --mode song --config tiny           # a 60 s song: seconds of stem per wall second
    python bench.py --mode song-f1 --model runs/drums   # beat F1: 60 s windowed vs the first 10 s alone

One set of random weights is built in a transformers `MusicgenForConditionalGeneration` and mapped
into ours with `stage_min.loading` (the same remapping `MusicGen.from_pretrained` uses). Both then
generate with guidance 3, top-k 250, batch 1, the same number of sequence steps (frames + 4; transformers
runs one forward more than ours, its first two without a cache). Timed: the text
encoder (a one-layer T5 of t5-base width, the same module for both), the cross-attention set-up,
the prefill and the decode loop; not timed: the codec (transformers' audio decode is stubbed out).
Prints one JSON line per run.

--mode song: a STAGE model of the preset's shape (random weights, the same small codec and one-layer
T5 as above: the real codec decodes more slowly) accompanies a 60 s synthetic song with songs.py's
defaults (10 s windows, 5 s overlap, guidance 3, top-k 250); timed: the whole call, decode included.
--mode song-f1: a trained drums model on synthetic songs (stage_min.synth, bass + chords as the
context): beat F1 (mir_eval, 70 ms) of the drums made for the whole 60 s, window by window, against
the F1 of drums made for the first 10 s alone. Windowing should cost at most 0.05 of F1.
"""
import json
import resource
import sys
import time

import torch

from stage_min import delay
from stage_min.cli import OneLineParser
from stage_min.generate import SamplingConfig, compiled_step, generate_tokens
from stage_min.loading import lm_config_from_hf, lm_state_from_hf, load_strict
from stage_min.model import LMConfig, MusicGenLM

PROMPT_TOKENS = 12  # a typical prompt length in t5 tokens


def hf_model(preset: LMConfig, seed: int = 0):
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    # t5-base width (the projection is part of the LM) but one layer: the text encoder is not what is measured
    text = T5Config(vocab_size=128, d_model=768, d_kv=64, d_ff=768, num_layers=1, num_heads=12)
    audio = EncodecConfig(sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
                          num_filters=4, hidden_size=16, codebook_size=2048, codebook_dim=16, num_lstm_layers=1,
                          use_causal_conv=False, normalize=False, pad_mode="reflect", chunk_length_s=None, overlap=None)
    decoder = MusicgenDecoderConfig(vocab_size=preset.card, hidden_size=preset.dim, num_hidden_layers=preset.n_layers,
                                    num_attention_heads=preset.n_heads, ffn_dim=preset.ffn_dim,
                                    num_codebooks=preset.n_codebooks, max_position_embeddings=2048, dropout=0.0)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config).eval()
    model.audio_encoder.decode = lambda codes, *a, **k: type("Out", (), {"audio_values": codes})()  # codec not timed
    return model


def our_lm(hf) -> MusicGenLM:
    state = hf.state_dict()
    cfg = lm_config_from_hf(hf.config.to_dict(), state)
    with torch.device("meta"):
        lm = MusicGenLM(cfg)
    load_strict(lm, lm_state_from_hf(state, cfg), "LM weights", assign=True)
    return lm.eval()


def memory_bandwidth(n_bytes: int = 1 << 30, device="cpu") -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of a few."""
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_weight_bytes(lm: MusicGenLM) -> int:
    """Weight bytes one decode step reads: everything but the text projection, the cross-attention
    key/value projections (computed once per generation) and the embedding tables (4 rows read)."""
    skip = ("text_proj.", "embed.", ".cross_attn.kv.")
    return sum(t.numel() * t.element_size() for name, t in lm.state_dict().items() if not any(s in name for s in skip))


def time_best(fn, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def stage_model_of_shape(preset: LMConfig, device, dtype):
    """A random STAGE MusicGen of the preset's LM shape, through a saved transformers folder."""
    import tempfile

    from stage_min.pipeline import MusicGen
    from stage_min.tiny import train_spiece

    with tempfile.TemporaryDirectory() as folder:
        hf_model(preset).save_pretrained(folder)
        train_spiece(f"{folder}/spiece.model")
        return MusicGen.from_pretrained(folder, device=device, dtype=dtype, stage=True)


def synthetic_song(seconds: float, seed: int):
    """(context: bass + chords, beat times) of a stage_min.synth song."""
    import numpy as np

    from stage_min.synth import make_song

    song = make_song(np.random.default_rng(seed), seconds)
    return song["bass"] + song["chords"], np.array([t for t, _ in song["beats"]])


def bench_song(args, device, dtype):
    from stage_min.songs import accompany_song

    model = stage_model_of_shape(LMConfig.preset(args.config), device, dtype)
    context, _ = synthetic_song(args.seconds, 0)
    accompany_song(model, context[:32000], "drums", window_s=1, overlap_s=0.5)  # warm-up: first-call paths
    best = time_best(lambda: accompany_song(model, context, "drums", seed=0), args.repeats, device)
    print(json.dumps({"mode": "song", "config": args.config, "dtype": args.dtype, "device": str(device),
                      "threads": torch.get_num_threads(), "song_s": args.seconds, "wall_s": round(best, 2),
                      "stem_s_per_wall_s": round(args.seconds / best, 3), "wall_s_per_song_minute": round(60 * best / args.seconds, 1)}),
          flush=True)


def bench_song_f1(args, device, dtype):
    import mir_eval
    import numpy as np

    from stage_min.evaluation import track_beats  # beat times only
    from stage_min.pipeline import MusicGen
    from stage_min.songs import accompany_song

    model = MusicGen.from_pretrained(args.model, device=device, dtype=dtype, stage=True)

    def f1(context, beats, seconds):
        stem, _ = accompany_song(model, context[:int(seconds * 32000)], args.prompt, seed=0)
        found = track_beats(stem.numpy(), 32000)
        return mir_eval.beat.f_measure(beats[beats < seconds], found, f_measure_threshold=0.07)

    whole, first = [], []
    for seed in range(args.songs):
        context, beats = synthetic_song(args.seconds, 1000 + seed)
        whole.append(f1(context, beats, args.seconds))
        first.append(f1(context, beats, 10.0))
    print(json.dumps({"mode": "song-f1", "model": args.model, "songs": args.songs, "song_s": args.seconds,
                      "f1_whole": round(float(np.mean(whole)), 3), "f1_first_10s": round(float(np.mean(first)), 3),
                      "within_0.05": bool(abs(np.mean(whole) - np.mean(first)) <= 0.05)}), flush=True)


def main(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--mode", default="decode", choices=["decode", "song", "song-f1"], help="decode: LM decoding speed, ours against transformers (eager, static cache, compiled); song: a whole song in windows; song-f1: beat F1 of a whole song against its first 10 s")
    p.add_argument("--seconds", type=float, default=60.0, help="song modes: the song's length")
    p.add_argument("--model", help="song-f1: a trained STAGE drums model (required there; unused by the other modes)")
    p.add_argument("--prompt", default="", help="song-f1: the prompt (default: empty)")
    p.add_argument("--songs", type=int, default=4, help="song-f1: synthetic songs averaged")
    p.add_argument("--config", default="tiny", choices=["tiny", "small", "medium", "large"], help="LM size, random weights of that shape (decode and song modes)")
    p.add_argument("--steps", type=int, default=0, help="LM forward steps (0: 256 for tiny, 64 otherwise)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best counts")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), getattr(torch, args.dtype)
    if args.mode == "song":
        return bench_song(args, device, dtype)
    if args.mode == "song-f1":
        if not args.model:
            p.error("--mode song-f1 needs --model (a trained STAGE drums model)")
        return bench_song_f1(args, device, dtype)
    steps = args.steps or (256 if args.config == "tiny" else 64)
    preset = LMConfig.preset(args.config)
    if steps < preset.n_codebooks:
        raise SystemExit(f"--steps must be >= {preset.n_codebooks}")

    hf = hf_model(preset).to(device)
    hf.text_encoder.to(dtype)  # transformers feeds the T5 states straight into the projection: same dtype
    hf.decoder.to(dtype)
    hf.enc_to_dec_proj.to(dtype)
    lm = our_lm(hf).to(device, dtype)
    sc = SamplingConfig(cfg_coef=3.0, top_k=250)
    ids = torch.randint(3, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)

    # ours: the same grid MusicGen.generate builds, steps + 1 interleaved steps = steps LM calls
    K, S = preset.n_codebooks, steps + 1
    grid = torch.full((2, K, S), preset.special_id, dtype=torch.long, device=device)
    known = ~delay.valid_mask(K, S - K, device).expand(2, K, S)

    def ours(step_fn=None, n_steps=steps):
        with torch.no_grad():
            states = hf.text_encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state.to(dtype)
            text = lm.project_text(states, mask)
            n = n_steps + 1
            return generate_tokens(lm, grid[..., :n], known[..., :n], text, mask, sc, step_fn=step_fn,
                                   free_cache=step_fn is None)

    def theirs(n_steps=steps):
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True, guidance_scale=3.0, top_k=250,
                               max_new_tokens=n_steps)

    def log(what):
        print(f"[bench {args.config} {args.dtype}] {what}", file=sys.stderr, flush=True)

    result = {"config": args.config, "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
              "steps": steps}
    warm = 2 * preset.n_codebooks  # a short warm-up run: first-call paths, allocator
    log("ours eager")
    ours(n_steps=warm)
    t_ours = time_best(ours, args.repeats, device)
    result["ours_steps_per_s"] = round(steps / t_ours, 2)
    best = t_ours
    if not args.no_compile:
        log("ours compiled: compiling")
        step_fn = compiled_step(lm)
        t0 = time.perf_counter()
        ours(step_fn)  # compiles (static shapes: the warm-up must have the timed size)
        result["compile_s"] = round(time.perf_counter() - t0, 1)
        t_comp = time_best(lambda: ours(step_fn), args.repeats, device)
        result["ours_compiled_steps_per_s"] = round(steps / t_comp, 2)
        best = min(best, t_comp)
    if not args.no_hf:
        log("transformers")
        theirs(warm)
        t_hf = time_best(theirs, args.repeats, device)
        result["hf_steps_per_s"] = round(steps / t_hf, 2)
        result["speedup"] = round(t_hf / best, 2)  # best of eager and compiled (compile time excluded)
        result["speedup_eager"] = round(t_hf / t_ours, 2)  # the default path, nothing to compile
    if device.type == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # the whole process (both models, Python, libraries): an upper bound
        result["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    bandwidth = memory_bandwidth(device=device)
    weight_bytes = step_weight_bytes(lm)
    result["weight_mb_per_step"] = round(weight_bytes / 2**20, 1)
    result["bandwidth_gbps"] = round(bandwidth / 1e9, 1)
    # the average step of the best whole run (text encoder, set-up and prefill included: a slight underestimate)
    result["mbu"] = round(weight_bytes / (best / steps) / bandwidth, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
