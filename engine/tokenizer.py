"""Tokenizer and chat template of a HF model directory (tokenizer.json + tokenizer_config.json)."""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, model_dir: str):
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        path = os.path.join(model_dir, "tokenizer_config.json")
        cfg = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        self.chat_template = cfg.get("chat_template")
        self.bos_token = cfg.get("bos_token") if isinstance(cfg.get("bos_token"), str) else None
        self.eos_token = cfg.get("eos_token") if isinstance(cfg.get("eos_token"), str) else None
        self.add_bos = bool(cfg.get("add_bos_token", False))

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
            raise ValueError("this model has no chat template; send 'prompt' instead of 'messages'")
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=False, lstrip_blocks=False)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")
