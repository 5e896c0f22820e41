r"""Prompts: the ASTRO instruction, chat formatting (Llama 3 or a tokenizer's own template), the math prompt every
sampling stage renders (`PromptConfig`: search, rl, difficulty, eval) and reflection markers.

Chat strings are complete prompts: they already contain BOS/special tokens as text, so encode them WITHOUT adding
special tokens (e.g. `Tokenizer.encode`, not `encode_prompt`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from datetime import datetime
from typing import Any, Mapping, Sequence

ASTRO_INSTRUCTION = ("Please reason step by step, separating the steps with blank lines, "
                     "and put your final answer within \\boxed{}.")

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
_ROLES = ("system", "user", "assistant", "ipython", "tool")


def math_messages(problem: str, system: str | None = None) -> list[dict[str, str]]:
  """Chat messages asking for a step-by-step solution of `problem` with a boxed final answer."""
  messages = [{"role": "system", "content": system}] if system is not None else []
  return messages + [{"role": "user", "content": f"{problem.strip()}\n\n{ASTRO_INSTRUCTION}"}]


def check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
  """ValueError naming the first message that lacks a known role or string content."""
  for i, m in enumerate(messages):
    if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} needs a role in {_ROLES} and string content, got {dict(m)!r}")


def llama3_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, bos: bool = True) -> str:
  """Messages in the Llama 3 chat format (content stripped, as Meta's template does), e.g.

  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\n\n   (the generation prompt; no newlines between turns)
  """
  check_messages(messages)
  turns = "".join(f"{START_HEADER}{m['role']}{END_HEADER}\n\n{m['content'].strip()}{EOT}" for m in messages)
  prompt = f"{START_HEADER}assistant{END_HEADER}\n\n" if add_generation_prompt else ""
  return (BEGIN_OF_TEXT if bos else "") + turns + prompt


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str):
  """A chat template compiled the way HF tokenizers do (sandboxed jinja, trim_blocks + lstrip_blocks)."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message: str):
    raise ValueError(f"chat template: {message}")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
  return env.from_string(chat_template)


def render_chat(messages: Sequence[Mapping[str, Any]], chat_template: str | None = None,
                special: Mapping[str, str] | None = None, *, add_generation_prompt: bool = True,
                **special_tokens: str) -> str:
  """Prompt text for `messages`: the tokenizer's jinja `chat_template` if it has one, else the Llama 3 format.

  `special` / `special_tokens` (e.g. bos_token="<s>", eos_token=...) are passed to the template as variables.
  """
  check_messages(messages)
  if not chat_template:
    return llama3_chat(messages, add_generation_prompt=add_generation_prompt)
  variables = {**(special or {}), **special_tokens}
  return _compile(chat_template).render(messages=[dict(m) for m in messages],
                                        add_generation_prompt=add_generation_prompt, **variables)


# ----------------------------------------------------------------------------------------------------------------
# The math prompt
# ----------------------------------------------------------------------------------------------------------------

EXAMPLE_PROBLEM = ("Tom has 3 boxes with 4 apples in each box. He eats 3 of the apples. How many apples does Tom "
                   "have left?")
EXAMPLE_SOLUTION = ("Tom has 3 boxes with 4 apples in each, so he has 3 * 4 = 12 apples.\n\n"
                    "He eats 3 of them, so he has 12 - 3 = 9 apples left.\n\n"
                    "The final answer is \\boxed{9}.")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """The math prompt: [system], [example problem + instruction -> example solution], problem + instruction (the
  search's few-shot default; see `search.policy`)."""
  instruction: str = ASTRO_INSTRUCTION
  example_problem: str = EXAMPLE_PROBLEM   # "" = zero-shot
  example_solution: str = EXAMPLE_SOLUTION
  system: str = ""                         # "" = none (the chat template may add its default)

  def messages(self, problem: str) -> list[dict[str, str]]:
    def ask(p: str) -> str:
      return f"{p.strip()}\n\n{self.instruction.strip()}" if self.instruction.strip() else p.strip()
    out = [{"role": "system", "content": self.system}] if self.system else []
    if self.example_problem:
      out += [{"role": "user", "content": ask(self.example_problem)},
              {"role": "assistant", "content": self.example_solution.strip()}]
    return out + [{"role": "user", "content": ask(problem)}]


def search_prompt_ids(tokenizer, prompt: PromptConfig, problem: str) -> list[int]:
  """Token ids of the prompt for `problem` (the search's root state); what the stages check against the context."""
  return tokenizer.encode_prompt(tokenizer.chat(prompt.messages(problem)))


# ----------------------------------------------------------------------------------------------------------------
# Self-reflection markers
# ----------------------------------------------------------------------------------------------------------------

_APOS = "['\u2019]"
_ASTRO_QUESTION = r"(?:but\s+)?wait,?\s+are\s+we\s+solving\s+(?:the|this)\s+problem\s+correctly(?:\s+so\s+far)?\??"
_ASTRO_NEGATIVE = (rf"i{_APOS}?m\s+not\s+sure\s+(?:if|whether)\s+we{_APOS}?re\s+solving\s+(?:the|this)\s+problem"
                   r"(?:\s+correctly)?(?:\s+so\s+far)?")
_BACKTRACK = rf"let(?:{_APOS}s|\s+us|\s+me)\s+(?:go\s+back|restart|start\s+over|backtrack|revisit)"

# One regex alternative per marker, tried in this order at each position; matches never overlap, so a whole ASTRO
# reflection ("But wait, are we solving the problem correctly so far? Hmm... I'm not sure if we're solving the
# problem correctly so far. Let's go back to ...") counts once, as does each free-form marker.
REFLECTION_PATTERNS: tuple[tuple[str, str], ...] = (
    ("astro_reflection", rf"{_ASTRO_QUESTION}(?:\W*hm+\b)?(?:\W*{_ASTRO_NEGATIVE})?(?:\W*{_BACKTRACK})?"),
    ("not_sure", _ASTRO_NEGATIVE),  # ASTRO's negative verdict on its own
    ("backtrack", _BACKTRACK),  # "Let's go back to where we ...", "Let's restart our solution ..."
    ("but_wait", r"\bbut\s+wait\b"),
    ("wait", r"\bwait\b(?=\s*[,.!\u2026])"),  # "Wait, ..." but not "we wait for"
    ("hmm", r"\bhm{2,}\b"),
    ("alternatively", r"\balternatively\b"),
    ("double_check",
     rf"\blet(?:{_APOS}s|\s+me|\s+us)\s+(?:double[-\s]check|re-?check|check|verify|re-?examine|reconsider)"),
    ("mistake", rf"\b(?:i\s+made\s+(?:a|an)\s+(?:mistake|error)|that{_APOS}?s\s+not\s+right|on\s+second\s+thought)"),
)
_REFLECTION = re.compile("|".join(f"(?:{p})" for _, p in REFLECTION_PATTERNS), re.IGNORECASE)
_BACKTRACK_RE = re.compile(_BACKTRACK, re.IGNORECASE)


def count_reflections(text: str) -> int:
  """Number of non-overlapping self-reflection markers (REFLECTION_PATTERNS, case-insensitive) in `text`."""
  return sum(1 for _ in _REFLECTION.finditer(text))


def count_backtracks(text: str) -> int:
  """Number of explicit backtracks/restarts ("Let's go back", "Let's restart", ...): ASTRO's backtrack count."""
  return sum(1 for _ in _BACKTRACK_RE.finditer(text))
