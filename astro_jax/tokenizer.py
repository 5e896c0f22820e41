"""Tokenizer wrapper: HF tokenizer files on disk -> ids, text, stop ids, chat prompts."""
from __future__ import annotations

import os
from typing import Sequence

# End-of-turn / end-of-text tokens of the Llama 3 and SmolLM2 families; whichever exist in a vocab stop sampling.
_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>")


class Tokenizer:
  """Thin layer over `transformers.AutoTokenizer` loaded from a local directory (never from a hub)."""

  def __init__(self, hf_tokenizer, extra_eos_ids: Sequence[int] = ()):
    self.hf = hf_tokenizer
    vocab = hf_tokenizer.get_vocab()
    eos = {i for i in (hf_tokenizer.eos_token_id, *extra_eos_ids) if i is not None}
    eos.update(vocab[t] for t in _END_TOKENS if t in vocab)
    self.eos_ids: tuple[int, ...] = tuple(sorted(eos))
    self.bos_id: int | None = hf_tokenizer.bos_token_id
    pad = hf_tokenizer.pad_token_id
    self.pad_id: int = pad if pad is not None else self.eos_ids[0]
    self.chat_template: str | None = getattr(hf_tokenizer, "chat_template", None)

  @classmethod
  def load(cls, path: str | os.PathLike, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer":
    from transformers import AutoTokenizer
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    return cls(AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True), extra_eos_ids)

  def __len__(self) -> int:
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` as written (special-token strings in it map to their ids; nothing is added)."""
    return self.hf.encode(text, add_special_tokens=False)

  def encode_prompt(self, text: str) -> list[int]:
    """Ids for a raw prompt: BOS first when this tokenizer uses one and the text does not start with it."""
    ids = self.encode(text)
    wants_bos = self.hf.encode("", add_special_tokens=True)[:1] == [self.bos_id] if self.bos_id is not None else False
    if wants_bos and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Prompt text for chat messages: this tokenizer's own template, else the Llama 3 chat format."""
    from astro_jax import prompts
    return prompts.render_chat(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                               bos_token=self.hf.bos_token or "")
