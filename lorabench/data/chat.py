"""Prompts as a model reads them: through its tokenizer's chat template where it has one.

An instruct model is trained on its chat format, so a prompt/completion row becomes one user
turn followed by the assistant's answer; a tokenizer without a template (the tiny zoo's, most
base models') reads the prompt as written. The completion is tokenized apart in both cases
and ends with the EOS token, which for a chat model is its end-of-turn token.
"""

from __future__ import annotations

from typing import Any


def prompt_token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt: the chat template's user turn and assistant header, or the plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompts)["input_ids"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    # the rendered template already holds its special tokens (BOS, role markers)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
