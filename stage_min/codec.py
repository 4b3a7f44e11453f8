"""EnCodec 32 kHz (MusicGen's audio tokenizer) through transformers' `EncodecModel`.

Not the `encodec` PyPI package: it ships only the 24/48 kHz models and imports torchaudio.
"""
import torch
from transformers import EncodecModel


class Codec(torch.nn.Module):
    def __init__(self, model: EncodecModel):
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.sample_rate = cfg.sampling_rate
        self.hop = 1
        for r in cfg.upsampling_ratios:
            self.hop *= r
        self.frame_rate = self.sample_rate / self.hop
        self.bandwidth = max(cfg.target_bandwidths)  # 2.2 kbps = 4 codebooks at 32 kHz
        self.n_codebooks = cfg.num_quantizers
        self.card = cfg.codebook_size

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, 1, samples) at `sample_rate` -> codes (B, K, frames)."""
        out = self.model.encode(audio, bandwidth=self.bandwidth, return_dict=True)
        return out.audio_codes[0]  # one chunk: (1, B, K, T) -> (B, K, T)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, frames) -> audio (B, 1, samples)."""
        return self.model.decode(codes[None], [None], return_dict=True).audio_values
