"""The router's tokenizer: `tokenizers` + the model's jinja chat template, without transformers.

Importing transformers' AutoTokenizer pulls in torch (seconds of start-up, hundreds of MB); the
router only needs the Rust tokenizer and a sandboxed jinja render, which give the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer


class ChatTemplateError(ValueError):
    """The template refused the messages (e.g. `raise_exception` on a bad role order)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, rust: RustTokenizer, chat_template: str | None, config: dict[str, Any]) -> None:
        self._tok = rust
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_ids = [i for i in [self.token_to_id(self.eos_token)] if i is not None]
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.filters["tojson"] = _tojson
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        config_path = path / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        return cls(RustTokenizer.from_file(str(path / "tokenizer.json")), template, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Like transformers: render, then encode without adding special tokens again."""
        return self.encode(self.render_chat(messages, add_generation_prompt))
