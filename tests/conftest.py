"""Tiny random checkpoints in the real file layouts, built once per test session."""
import io
import logging

import pytest
import sentencepiece as spm
import torch

logging.getLogger("transformers").setLevel(logging.ERROR)

CORPUS = [
    "funky drums with a tight snare", "deep bass line in a minor key", "ambient pads and soft piano",
    "80s pop track with bassy drums and synth", "90s rock song with loud guitars and heavy drums",
    "lofi hip hop beat", "jazz trio with brushes on the snare", "electronic dance music at 128 bpm",
    "acoustic guitar ballad", "orchestral strings crescendo", "reggae groove with offbeat chords",
]


def train_spiece(path):
    """A sentencepiece model with t5's special ids: pad 0, eos 1, unk 2."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=64, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def tiny_hf_config(dim=64, layers=2, heads=4, text_dim=32, vocab=120):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    text = T5Config(vocab_size=vocab, d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    audio = EncodecConfig(
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
        num_filters=4, hidden_size=16, codebook_size=2048, codebook_dim=16, num_lstm_layers=1,
        use_causal_conv=False, normalize=False, pad_mode="reflect", chunk_length_s=None, overlap=None,
    )
    decoder = MusicgenDecoderConfig(
        vocab_size=2048, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * dim,
        num_codebooks=4, max_position_embeddings=2048, dropout=0.0,
    )
    return MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())


def build_tiny_hf(folder, seed=0, **kw):
    """A random transformers MusicGen saved with save_pretrained, plus a spiece.model."""
    from transformers import MusicgenForConditionalGeneration

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(tiny_hf_config(**kw)).eval()
    with torch.no_grad():  # the codebooks of a fresh EnCodec are zeros; give them values
        for p in model.audio_encoder.quantizer.parameters():
            p.normal_()
        for name, b in model.audio_encoder.quantizer.named_buffers():
            if name.endswith("embed"):
                b.normal_()
    model.save_pretrained(folder)
    train_spiece(folder / "spiece.model")
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(folder, transformers model) of one tiny random MusicGen."""
    folder = tmp_path_factory.mktemp("tiny_musicgen")
    model = build_tiny_hf(folder)
    return folder, model
