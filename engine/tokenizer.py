"""Tokenizer and chat template of a HF model directory (tokenizer.json + tokenizer_config.json).

The chat template is the checkpoint's own: `chat_template.jinja` (transformers 5 saves it there),
else tokenizer_config.json's `chat_template` (a string, or named templates of which 'default' is
used). It renders in the Jinja environment transformers' `apply_chat_template` uses (sandboxed,
trim_blocks and lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`,
the special tokens as variables), and the rendered text is tokenized without adding special tokens,
as transformers does: the template writes them.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import Tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(model_dir: str, cfg: dict) -> str | None:
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _environment():
    """The Jinja environment of transformers' chat templates (utils/chat_template_utils.py)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class TextCodec:
    def __init__(self, model_dir: str):
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        path = os.path.join(model_dir, "tokenizer_config.json")
        cfg = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        self.chat_template = _chat_template(model_dir, cfg)
        self.special_tokens = {k: t for k in SPECIAL_TOKENS if (t := _token_text(cfg.get(k))) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self._compiled = None

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt tokenised on the server's
        # worker thread leaves its event loop (/health, other streams) running meanwhile
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
        bos = self.tokenizer.token_to_id(self.bos_token) if self.add_bos and self.bos_token else None
        return ([bos] + ids) if bos is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text of a conversation, ending where the assistant's turn starts."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json or "
                             "chat_template.jinja); send 'prompt' instead of 'messages'")
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        return self._compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                     **self.special_tokens)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids of a conversation: the rendered template tokenized as it is (the template
        writes the special tokens, so none are added), as transformers' apply_chat_template does."""
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids
