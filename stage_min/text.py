"""Text conditioning: t5-base's sentencepiece tokenizer and transformers' T5 encoder.

The projection to the decoder width lives in the LM (`MusicGenLM.text_proj`), because it is
trained with it; this file only turns prompts into T5 hidden states and a padding mask.
"""
import sentencepiece as spm
import torch
from transformers import T5EncoderModel

PAD_ID, EOS_ID = 0, 1  # t5's ids: pad 0, end-of-sequence 1


class TextEncoder(torch.nn.Module):
    def __init__(self, spiece_path: str, t5: T5EncoderModel, max_tokens: int = 256):
        super().__init__()
        self.sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
        self.t5 = t5.eval()
        self.max_tokens = max_tokens

    @property
    def dim(self) -> int:
        return self.t5.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ids (B, L) right-padded with 0, mask (B, L) bool. Each ends with EOS.
        An empty prompt gets an all-false mask: it is the null condition, as in audiocraft and
        in STAGE's training data (songs without a caption), not a text made of EOS alone."""
        pieces = [self.sp.encode(p)[: self.max_tokens - 1] + [EOS_ID] for p in prompts]
        L = max(len(p) for p in pieces)
        ids = torch.full((len(prompts), L), PAD_ID, dtype=torch.long)
        for i, p in enumerate(pieces):
            ids[i, : len(p)] = torch.tensor(p)
        empty = torch.tensor([not p.strip() for p in prompts])[:, None]
        return ids, (ids != PAD_ID) & ~empty

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> T5 last hidden states (B, L, 768), mask (B, L)."""
        ids, mask = self.tokenize(prompts)
        device = next(self.t5.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        # T5 still sees each row's EOS (an all-masked row is undefined for it); empty rows are then
        # zeroed by the projection through their all-false mask
        states = self.t5(input_ids=ids, attention_mask=(ids != PAD_ID).long()).last_hidden_state
        return states, mask
