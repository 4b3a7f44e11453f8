"""A tiny random MusicGen in the transformers layout: try the whole pipeline offline, in seconds.

    python -m stage_min.toy.tiny weights/tiny-base                   # random weights
    python -m stage_min.toy.tiny weights/tiny-base --hear data/synth  # and a codec that hears that audio

It holds everything a real checkpoint holds (T5 encoder, EnCodec 32 kHz with 4 codebooks of 2048,
the decoder, a sentencepiece model with t5's special ids), only very small and untrained: use it
as `--base` for `train.py --preset tiny`, or as `--model` for `sample.py`. The tests build theirs
with the same code.
"""
import io
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import soundfile as sf
import torch

from ..cli.options import OneLineParser

CORPUS = [
    "funky drums with a tight snare", "deep bass line in a minor key", "ambient pads and soft piano",
    "80s pop track with bassy drums and synth", "90s rock song with loud guitars and heavy drums",
    "lofi hip hop beat", "jazz trio with brushes on the snare", "electronic dance music at 128 bpm",
    "acoustic guitar ballad", "orchestral strings crescendo", "reggae groove with offbeat chords",
]


def train_spiece(path: Path):
    """A sentencepiece model with t5's special ids: pad 0, eos 1, unk 2."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=64, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    Path(path).write_bytes(model.getvalue())


def tiny_config(dim=64, layers=2, heads=4, text_dim=32, vocab=120, audio=None):
    """A tiny MusicgenConfig; `audio`: an EncodecConfig to use instead of the tiny random codec's."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(vocab_size=vocab, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    audio = audio or EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
        num_filters=4, hidden_size=16, codebook_size=2048, codebook_dim=16, num_lstm_layers=1,
        use_causal_conv=False, normalize=False, pad_mode="reflect", chunk_length_s=None, overlap=None,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=audio.codebook_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * dim,
        num_codebooks=4, max_position_embeddings=2048, dropout=0.0,
        # MusicGen's special code (= codebook size) is a row past the vocabulary, which transformers'
        # config check flags as out of range: it goes in the generation config instead (see build)
        pad_token_id=None, bos_token_id=None,
    )
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())


def randomise_constants(model, seed=0, std=0.2):
    """Give every parameter of the decoder, the text projection and the T5 encoder that still holds a
    constant (LayerNorm weights 1 and biases 0, `enc_to_dec_proj.bias` 0: transformers' init) random
    values around that constant. With the init's values a swapped or dropped norm or bias changes no
    logit, so a wrong key table would pass every parity test; with these, every key a table maps
    changes the logits (tests/test_formats.py checks that no two mapped tensors are alike)."""
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("audio_encoder.") or p.numel() < 2:
                continue
            first = p.flatten()[0]
            if bool((p == first).all()):
                p.copy_(first + std * torch.randn(p.shape, generator=g))


def build(folder, seed=0, codec=None, random_norms=False, **config):
    """Write a random transformers MusicGen (save_pretrained) plus spiece.model; returns the model.
    `codec`: a trained EncodecModel to put in instead of a random one (the toy model's base).
    random_norms: also randomise the norms and biases that transformers initialises to constants
    (see randomise_constants; what the tests build, off for the toy recipe's base)."""
    from transformers import MusicgenForConditionalGeneration

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(tiny_config(**config, audio=codec.config if codec else None)).eval()
    special = model.config.decoder.vocab_size  # generate() starts and pads with it, as the hub repos' generation_config.json says
    model.generation_config.update(bos_token_id=special, pad_token_id=special, decoder_start_token_id=special)
    with torch.no_grad():
        if codec is not None:
            model.audio_encoder.load_state_dict(codec.state_dict())
        else:  # a fresh EnCodec's codebooks are zeros: give them values
            for name, buffer in model.audio_encoder.quantizer.named_buffers():
                if name.endswith("embed"):
                    buffer.normal_()
    if random_norms:
        randomise_constants(model, seed)
    model.save_pretrained(folder)
    train_spiece(Path(folder) / "spiece.model")
    return model


def make_codec_hear(folder, audio_files, seed=0, n_distinct=(32, 2, 2, 2)):
    """Make the random EnCodec of `folder` hear its input. A freshly initialised one does not: its
    conv biases dominate, so every frame gets the same code and no model could learn anything from
    the codes. Zero biases and larger weight-norm gains let the signal through; the codebooks are then
    drawn from the latents of the given audio (as EnCodec initialises its own codebooks from data),
    with few distinct entries per level, so that codes are coarse and repeat and codebook 0 carries
    most of the information, as in a trained codec."""
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(folder)
    codec = model.audio_encoder
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in codec.encoder.modules():
            if isinstance(module, torch.nn.Conv1d):
                if module.bias is not None:
                    module.bias.zero_()
                for name, p in module.named_parameters():
                    if name.endswith("original0") or name == "weight_g":
                        p.fill_(1.5)
        audio = np.concatenate([sf.read(str(f), dtype="float32", always_2d=True)[0].mean(1)[: 32000 * 4] for f in audio_files])
        latents = codec.encoder(torch.from_numpy(audio)[None, None])[0].T  # (frames, latent dim)
        for layer, n in zip(codec.quantizer.layers, n_distinct):
            centres = latents[torch.randint(len(latents), (n,), generator=g)]
            rows = layer.codebook.embed.shape[0]
            layer.codebook.embed.copy_(centres.repeat(rows // n + 1, 1)[:rows])
            latents = latents - centres[torch.cdist(latents, centres).argmin(1)]  # the residual goes on
    model.save_pretrained(folder)


def main(argv=None):
    from transformers.utils import logging as hf_logging

    from ..io.formats import _write_folder, check_new_folder
    from ..io.loading import LoadError

    hf_logging.set_verbosity_error()  # a tool's output: its result or one error line, not transformers' chatter
    hf_logging.disable_progress_bar()

    p = OneLineParser(description=__doc__)
    p.add_argument("out", help="folder to write (must not exist, or be empty)")
    p.add_argument("--hear", help="a dataset folder (plain layout): fit the codec's codebooks to its drums and bass (default: random codebooks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.seed < 2**32:  # numpy's and torch's generators both take it
            raise ValueError(f"--seed must be in [0, 2^32 - 1], got {args.seed}")
        check_new_folder(args.out)
        files = []
        if args.hear:
            if not Path(args.hear).is_dir():
                raise ValueError(f"--hear {args.hear} is not a folder")
            files = sorted(Path(args.hear).glob("*/drums.wav"))[:6] + sorted(Path(args.hear).glob("*/bass.wav"))[:6]
            if not files:
                raise ValueError(f"{args.hear} has no song folders with drums.wav or bass.wav")

        def fill(tmp):  # built under a temporary name: a failure never leaves a half-built model folder
            build(tmp, seed=args.seed)
            if files:
                make_codec_hear(tmp, files, seed=args.seed)

        _write_folder(Path(args.out), fill)
    except (LoadError, ValueError, OSError, RuntimeError) as e:  # RuntimeError: soundfile on a corrupt --hear file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote a tiny random MusicGen to {args.out}")


if __name__ == "__main__":
    main()
