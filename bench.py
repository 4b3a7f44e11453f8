"""Decoding speed: ours (eager and torch.compile) against transformers' MusicGen, same random weights.

    python bench.py --config tiny
    python bench.py --config small --steps 64
    python bench.py --config small --dtype bfloat16
    python bench.py --mode song --config tiny           # a 60 s song: seconds of stem per wall second
    python bench.py --mode song-f1 --model weights/stage-toy   # beat F1: 60 s windowed vs the first 10 s alone

One set of random weights is built in a transformers `MusicgenForConditionalGeneration` and mapped
into ours with `stage_min.io.loading` (the same remapping `MusicGen.from_pretrained` uses). Both then
generate with guidance 3, top-k 250, batch 1, the same number of sequence steps (frames + 4; transformers
runs one forward more than ours, its first two without a cache). Timed: the text
encoder (a one-layer T5 of t5-base width, the same module for both), the cross-attention set-up,
the prefill and the decode loop; not timed: the codec (transformers' audio decode is stubbed out).
Prints one JSON line per run.

--mode song: a STAGE model of the preset's shape (random weights, the same small codec and one-layer
T5 as above: the real codec decodes more slowly) accompanies a 60 s synthetic song with songs.py's
defaults (10 s windows, 5 s overlap, guidance 3, top-k 250); timed: the whole call, decode included.
--mode song-f1: a trained drums model on synthetic songs (stage_min.toy.synth, `--style toy` by default:
the style weights/stage-toy learnt; bass + chords as the context): beat F1 (mir_eval, 70 ms) of the
drums made for the whole 60 s, window by window, against the F1 of their first 10 s (tracked alone),
and of each 10 s (a late stretch that follows less shows drift). Windowing
should cost at most 0.05 of F1: within_0.05 compares the whole with the first 10 s (the tracker also
finds a tempo more surely in 60 s than in 10 s), later_10s_not_below_first_by_0.05 compares like with
like. f1_reference: the songs' own drums scored the same way (the ceiling).
"""
import json
import resource
import sys
import time

import torch

from stage_min import delay
from stage_min.cli.options import OneLineParser
from stage_min.generate import SamplingConfig, compiled_step, fast_cpu_decode, generate_tokens
from stage_min.io.loading import lm_config_from_hf, lm_state_from_hf, load_strict
from stage_min.model import LMConfig, MusicGenLM
from stage_min.stage import StageLoss, target_loss

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
    return fast_cpu_decode(lm.eval())  # as from_pretrained loads it


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

    from stage_min.io.pretrained import from_pretrained
    from stage_min.toy.tiny import train_spiece

    with tempfile.TemporaryDirectory() as folder:
        hf_model(preset).save_pretrained(folder)
        train_spiece(f"{folder}/spiece.model")
        return from_pretrained(folder, device=device, dtype=dtype, stage=True)


def synthetic_song(seconds: float, seed: int, style: str = "default"):
    """A stage_min.toy.synth song in a song_styles() style, with its context (bass + chords) and beat times."""
    import numpy as np

    from stage_min.toy.synth import make_song

    song = make_song(np.random.default_rng(seed), seconds, style=song_styles()[style])
    return {**song, "context": song["bass"] + song["chords"], "beat_times": np.array([t for t, _ in song["beats"]])}


def song_styles() -> dict:
    from stage_min.toy import synth

    return {"toy": synth.TOY, "default": synth.Style()}


def bench_song(args, device, dtype):
    from stage_min.songs import accompany_song

    model = stage_model_of_shape(LMConfig.preset(args.config), device, dtype)
    context = synthetic_song(args.seconds, 0)["context"]
    accompany_song(model, context[:32000], "drums", window_s=1, overlap_s=0.5)  # warm-up: first-call paths
    best = time_best(lambda: accompany_song(model, context, "drums", seed=0), args.repeats, device)
    print(json.dumps({"mode": "song", "config": args.config, "dtype": args.dtype, "device": str(device),
                      "threads": torch.get_num_threads(), "song_s": args.seconds, "wall_s": round(best, 2),
                      "stem_s_per_wall_s": round(args.seconds / best, 3), "wall_s_per_song_minute": round(60 * best / args.seconds, 1)}),
          flush=True)


def bench_song_f1(args, device, dtype):
    import mir_eval
    import numpy as np

    from stage_min.eval.evaluation import track_beats  # beat times only
    from stage_min.io.pretrained import from_pretrained
    from stage_min.songs import accompany_song

    model = from_pretrained(args.model, device=device, dtype=dtype, stage=True)
    sr, first_s = model.sample_rate, 10.0

    def f1(stem, beats, start, end):  # the stem's beats tracked in [start, end) against the song's there
        found = track_beats(stem[int(start * sr):int(end * sr)], sr) + start
        return float(mir_eval.beat.f_measure(beats[(beats >= start) & (beats < end)], found, f_measure_threshold=0.07))

    whole, segments, reference = [], [], []
    for seed in range(args.songs):
        song = synthetic_song(args.seconds, 1000 + seed, args.style)
        context, beats = song["context"], song["beat_times"]
        prompt = song["caption"] if args.prompt is None else args.prompt
        reference.append(f1(song["drums"], beats, 0, args.seconds))  # the song's own drums: the ceiling of this scoring
        stem = accompany_song(model, context, prompt, seed=seed)[0].numpy()
        whole.append(f1(stem, beats, 0, args.seconds))
        # 10 s at a time: does a late stretch follow the song less than the first? (generation is causal, so
        # the first 10 s are what the first 10 s alone would get: the same windows, the same seed)
        segments.append([f1(stem, beats, t, min(t + first_s, args.seconds)) for t in np.arange(0, args.seconds - 1, first_s)])
    segments = np.array(segments)
    first = segments[:, 0]
    print(json.dumps({"mode": "song-f1", "model": args.model, "style": args.style, "songs": args.songs, "song_s": args.seconds,
                      "prompt": "each song's caption" if args.prompt is None else args.prompt,
                      "f1_whole": round(float(np.mean(whole)), 3), "f1_first_10s": round(float(np.mean(first)), 3),
                      "f1_per_10s_of_whole": [round(float(x), 3) for x in segments.mean(axis=0)],
                      "f1_reference": round(float(np.mean(reference)), 3),
                      "within_0.05": bool(abs(np.mean(whole) - np.mean(first)) <= 0.05),
                      # a tracker hears a tempo better in 60 s than in 10 s, so f1_whole is not like for like:
                      # the later 10 s stretches of the same stem, tracked alone, against the first
                      "later_10s_not_below_first_by_0.05": bool(segments[:, 1:].mean() >= np.mean(first) - 0.05)}),
          flush=True)


def stage_pair(preset: LMConfig, device, dtype):
    """The original STAGE decoder (x-transformers 1.26.0, stage_min.eval.original) of a preset's shape with
    random weights, and our LM holding the same weights, mapped through the official checkpoint's key
    table (formats.py, as `MusicGen.from_pretrained` reads an official file)."""
    from stage_min.eval import original
    from stage_min.io.formats import STAGE_LM, STAGE_TEXT, lm_config_from_stage, stage_lm_key_table
    from stage_min.io.loading import gather

    decoder = original.build_decoder(preset.dim, preset.n_layers, card=preset.card, n_q=preset.n_codebooks,
                                     max_seq_len=8192, random_norms=False)
    torch.manual_seed(1)
    proj = torch.nn.Linear(preset.text_dim, preset.dim)
    state = {STAGE_LM + k: v for k, v in decoder.state_dict().items()}
    state.update({f"{STAGE_TEXT}output_proj.{k}": v for k, v in proj.state_dict().items()})
    cfg = lm_config_from_stage(state)
    with torch.device("meta"):
        lm = MusicGenLM(cfg)
    load_strict(lm, gather(state, stage_lm_key_table(cfg), "STAGE weights"), "LM weights", assign=True)
    return decoder.to(device), fast_cpu_decode(lm.to(device, dtype).eval())


def bench_stage(args, device, dtype):
    """Accompaniment: ours (static KV cache; eager and compiled) against the original's loop (the whole
    sequence re-run at every step), one JSON line per stem length."""
    import warnings

    import numpy as np

    from stage_min.eval import original
    from stage_min.stage import generation_rows

    warnings.filterwarnings("ignore", message=".*sdp_kernel.*")  # x-transformers 1.26's deprecated torch call

    preset = LMConfig.preset(args.config)
    decoder, lm = stage_pair(preset, device, dtype)
    K, special, sc = preset.n_codebooks, lm.cfg.special_id, SamplingConfig(cfg_coef=3.0, top_k=250)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, PROMPT_TOKENS, lm.cfg.dim, generator=g).to(device)
    mask = torch.ones(1, PROMPT_TOKENS, dtype=torch.bool, device=device)
    n_ctx = int(round(args.context_seconds * 50))
    context = torch.randint(0, preset.card, (1, K, n_ctx), generator=g).to(device)

    def log(what):
        print(f"[bench stage {args.config}] {what}", file=sys.stderr, flush=True)

    for stem_s in [float(x) for x in args.stem_seconds.split(",")]:
        n_target = int(round(stem_s * 50))
        grid, known, keep, _ = generation_rows(context, torch.tensor([n_ctx], device=device), n_target, special,
                                               lm.cfg.context_id, guidance=True)
        first, S = int((~known).any(1).any(0).nonzero()[0]), grid.shape[-1]
        n_steps = S - first
        ours = lambda step_fn=None: generate_tokens(lm, grid, known, text.to(dtype), mask, sc, keep=keep,  # noqa: E731
                                                    step_fn=step_fn, free_cache=step_fn is None)
        result = {"mode": "stage", "config": args.config, "dtype": args.dtype, "device": str(device),
                  "threads": torch.get_num_threads(), "context_s": args.context_seconds, "stem_s": stem_s,
                  "sampling_steps": n_steps}
        log(f"{stem_s:g} s stem: ours eager")
        ours()
        t_ours = time_best(ours, args.repeats, device)
        result["ours_s"] = round(t_ours, 2)
        best = t_ours
        if not args.no_compile:
            log(f"{stem_s:g} s stem: ours compiled")
            step_fn = compiled_step(lm)
            ours(step_fn)  # compiles for this size
            t_comp = time_best(lambda: ours(step_fn), args.repeats, device)
            result["ours_compiled_s"] = round(t_comp, 2)
            best = min(best, t_comp)
        # the original: each step costs one decoder pass over the prefix, so a few timed steps at the
        # start, middle and end give the whole loop (a quadratic in the prefix length, summed); with
        # --original-full the whole loop is run and timed as well
        log(f"{stem_s:g} s stem: original, timed steps")
        at = [first, (first + S - 1) // 2, S - 2]
        per_step = [time_best(lambda s=s: original.generate(decoder, grid, known, text, mask, sc, first=s, last=s + 2),
                              args.repeats, device) / 2 for s in at]
        coef = np.polyfit(at, per_step, 2)
        estimate = float(np.polyval(coef, np.arange(first, S)).sum())
        result["original_step_s_first_last"] = [round(per_step[0], 4), round(per_step[-1], 4)]
        result["original_s_estimated"] = round(estimate, 1)
        if args.original_full:
            log(f"{stem_s:g} s stem: original, whole loop")
            result["original_s"] = round(time_best(lambda: original.generate(decoder, grid, known, text, mask, sc), 1, device), 1)
        t_orig = result.get("original_s", estimate)
        result["speedup"] = round(t_orig / best, 1)
        result["speedup_eager"] = round(t_orig / t_ours, 1)
        print(json.dumps(result), flush=True)


def train_step_fn(variant: str, preset: LMConfig, batch: int, frames: int, context_frames: int, device, lr: float = 1e-4):
    """One STAGE training step (forward, target loss, backward, AdamW) of `variant` on random codes and
    text states, the same weights for ours and transformers: a [context][separator][target] grid, the
    loss on target tokens only (train.py's). `ours` (train.py's StageLoss: logits for target steps only),
    `ours_compiled` (the same under torch.compile) or `hf` (transformers' MusicgenForCausalLM, the T5
    projection in front; it makes logits for every step). The separator is the special id here:
    transformers' embedding has no row for STAGE's context token, and the cost is the same.
    Returns (step, n_params)."""
    from stage_min.stage import build_sequence

    hf = hf_model(preset)
    K, special = preset.n_codebooks, preset.special_id
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, preset.card, (batch, K, context_frames), generator=g)
    codes = torch.randint(0, preset.card, (batch, K, frames), generator=g)
    seq = build_sequence(context, codes, frames, special, special, torch.full((batch,), context_frames), None)
    grid, keep, target = seq.grid.to(device), seq.keep.to(device), seq.target.to(device)
    S = grid.shape[-1]
    states = torch.randn(batch, PROMPT_TOKENS, hf.config.text_encoder.d_model, generator=g).to(device)
    mask = torch.ones(batch, PROMPT_TOKENS, dtype=torch.bool, device=device)

    if variant == "hf":
        proj, decoder = hf.enc_to_dec_proj.to(device), hf.decoder.to(device).train()
        params = list(proj.parameters()) + list(decoder.parameters())

        def forward():
            logits = decoder(input_ids=grid.reshape(batch * K, S), encoder_hidden_states=proj(states),
                             encoder_attention_mask=mask.long()).logits.view(batch, K, S, -1)
            return target_loss(logits, grid, target)
    else:
        lm = our_lm(hf).to(device).train()
        if "lora" in variant:  # train.py --lora-rank 16 (the default targets: q, k, v, out)
            from stage_min.train.lora import LoraSpec, add_adapters
            add_adapters(lm, LoraSpec(16, 32.0))
        lm.checkpoint_blocks = "ckpt" in variant  # train.py --checkpoint-activations
        params, loss_fn = [p for p in lm.parameters() if p.requires_grad], StageLoss(lm)

        def forward():
            return loss_fn(grid, keep, target, states, mask)
        if variant == "ours_compiled":
            forward = torch.compile(forward)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=1e-3)

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in params)


def bench_train_variant(args, device):
    """The child process of --mode train: one variant, its own process so that its peak memory is its own."""
    preset = LMConfig.preset(args.config)
    step, n_params = train_step_fn(args.variant, preset, args.batch, args.frames, args.context_frames, device)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    loss0 = step()  # warm-up (the compile, for the compiled variant); the same weights give the same loss
    first_s = time.perf_counter() - t0
    best = time_best(step, args.repeats, device)
    frames = args.batch * (args.context_frames + 1 + args.frames + preset.n_codebooks)  # sequence steps (K tokens each)
    out = {"variant": args.variant, "params_m": round(n_params / 1e6, 1), "step_s": round(best, 3),
           "steps_per_s": round(1 / best, 3), "frames_per_s": round(frames / best, 1), "first_step_s": round(first_s, 1),
           "first_loss": round(loss0, 4)}
    if device.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # process peak RSS above what it held before the first step (weights, data, libraries)
        out["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, 1)
    print(json.dumps(out), flush=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bench_train(args, device):
    """--mode train: each variant in a child process; one JSON line with the ratios."""
    import subprocess

    variants = ["hf", "ours"] + ([] if args.no_compile else ["ours_compiled"]) + ["ours_lora", "ours_ckpt", "ours_lora_ckpt"]
    result = {"mode": "train", "config": args.config, "device": str(device), "threads": torch.get_num_threads(),
              "batch": args.batch, "context_frames": args.context_frames, "frames": args.frames}
    for v in variants:
        print(f"[bench train {args.config}] {v}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--mode", "train", "--variant", v, "--config", args.config, "--batch", str(args.batch),
               "--frames", str(args.frames), "--context-frames", str(args.context_frames), "--repeats", str(args.repeats), "--device", str(device)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"bench.py: the {v} variant failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        child = json.loads(r.stdout.strip().splitlines()[-1])
        for k in ("step_s", "frames_per_s", "peak_mem_mb", "first_step_s", "params_m", "first_loss"):
            result[f"{v}_{k}"] = child[k]
    losses = [result.pop(f"{v}_first_loss") for v in variants]
    result["same_first_loss"] = max(losses) - min(losses) < 1e-3  # a check that both sides compute the same thing
    result["speedup"] = round(result["hf_step_s"] / result["ours_step_s"], 2)
    if "ours_compiled_step_s" in result:
        result["speedup_compiled"] = round(result["hf_step_s"] / result["ours_compiled_step_s"], 2)
    result["memory_ratio"] = round(result["ours_peak_mem_mb"] / max(result["hf_peak_mem_mb"], 1e-9), 2)
    for v in ("ours_lora", "ours_ckpt", "ours_lora_ckpt"):  # against full fine-tuning (ours), the same shape
        result[f"{v}_speed_vs_full"] = round(result["ours_step_s"] / result[f"{v}_step_s"], 2)
        result[f"{v}_memory_vs_full"] = round(result[f"{v}_peak_mem_mb"] / max(result["ours_peak_mem_mb"], 1e-9), 2)
    print(json.dumps(result), flush=True)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__)
    p.add_argument("--mode", default="decode", choices=["decode", "stage", "train", "song", "song-f1"], help="decode: LM decoding speed, ours against transformers (eager, static cache, compiled); train: forward + backward + AdamW, ours against transformers; stage: accompaniment, ours against the original STAGE loop; song: a whole song in windows; song-f1: beat F1 of a whole song against its first 10 s")
    p.add_argument("--batch", type=int, default=4, help="train: rows per step")
    p.add_argument("--frames", type=int, default=500, help="train: target frames per row (500 = 10 s)")
    p.add_argument("--context-frames", type=int, default=500, help="train: context frames per row (0: plain MusicGen rows)")
    p.add_argument("--variant", default="all", choices=["all", "hf", "ours", "ours_compiled", "ours_lora", "ours_ckpt", "ours_lora_ckpt"], help="train: every variant, each in a child process, or one only (what each child runs); ours_lora: LoRA rank 16 on q,k,v,out; ours_ckpt: --checkpoint-activations")
    p.add_argument("--context-seconds", type=float, default=10.0, help="stage: context length")
    p.add_argument("--stem-seconds", default="10", help="stage: stem lengths, comma list (e.g. 5,10,20)")
    p.add_argument("--original-full", action="store_true", help="stage: also run the original's whole loop (slow), not only the timed steps it is estimated from")
    p.add_argument("--seconds", type=float, default=60.0, help="song modes: the song's length")
    p.add_argument("--model", help="song-f1: a trained STAGE drums model (required there; unused by the other modes)")
    p.add_argument("--prompt", default=None, help="song-f1: the prompt (default: each song's caption, as evaluate.py's accompaniment)")
    p.add_argument("--songs", type=int, default=8, help="song-f1: synthetic songs averaged")
    p.add_argument("--style", default="toy", choices=["toy", "default"], help="song-f1: stage_min.toy.synth style of the songs "
                   "(toy: synth.TOY, what weights/stage-toy was trained on; default: synth.Style())")
    p.add_argument("--config", default="tiny", choices=["tiny", "small", "medium", "large"], help="LM size, random weights of that shape (decode and song modes)")
    p.add_argument("--steps", type=int, default=0, help="LM forward steps (0: 256 for tiny, 64 otherwise)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant; the best counts")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args(argv)
    if args.mode == "song-f1" and not args.model:
        p.error("--mode song-f1 needs --model (a trained STAGE drums model)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), getattr(torch, args.dtype)
    if args.mode == "train":
        return bench_train(args, device) if args.variant == "all" else bench_train_variant(args, device)
    modes = {"decode": bench_decode, "stage": bench_stage, "song": bench_song, "song-f1": bench_song_f1}
    return modes[args.mode](args, device, dtype)


def bench_decode(args, device, dtype):
    """Decode steps per second: ours eager and compiled, against transformers' generate, with the same
    random weights, prompt and sampling; then memory and memory-bandwidth utilisation."""
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
    result.update(memory_figures(lm, best / steps, device))
    print(json.dumps(result), flush=True)


def memory_figures(lm, step_seconds: float, device) -> dict:
    """Peak memory, the weight bytes a decode step reads, and the share of the memory bandwidth it reaches."""
    result = {}
    if device.type == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:  # the whole process (both models, Python, libraries): an upper bound
        result["peak_mem_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    bandwidth = memory_bandwidth(device=device)
    weight_bytes = step_weight_bytes(lm)
    result["weight_mb_per_step"] = round(weight_bytes / 2**20, 1)
    result["bandwidth_gbps"] = round(bandwidth / 1e9, 1)
    # the average step of the best whole run (text encoder, set-up and prefill included: a slight underestimate)
    result["mbu"] = round(weight_bytes / step_seconds / bandwidth, 3)
    return result


if __name__ == "__main__":
    main()
