"""Chat templates: the base model's own Jinja2 template (copied into the bundle's ``tokenizer/`` at export), rendered
in a sandboxed environment — a template is code from a model repository and must not reach Python objects."""

from __future__ import annotations

import datetime


from ...errors import InputError
from ...runtime.tokenizer import tokenizer_config


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise InputError(f"the bundle's chat template does not compile ({e})") from None
        self.special = special

    @classmethod
    def from_bundle(cls, bundle) -> "ChatTemplate | None":
        """The bundle's chat template (``tokenizer/chat_template.jinja`` or ``chat_template`` in
        ``tokenizer_config.json``), or None when the base model has none."""
        cfg = tokenizer_config(bundle)
        source = None
        if bundle.has_file("tokenizer/chat_template.jinja"):
            source = bundle.read_bytes("tokenizer/chat_template.jinja").decode("utf-8", errors="replace")
        elif isinstance(cfg.get("chat_template"), str):
            source = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            return None
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                special[key] = v
        return cls(source, special)

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.special)
        except SecurityError as e:
            raise InputError(f"the chat template tried something the sandbox forbids ({e})") from None
        except (TemplateError, TypeError, ValueError) as e:
            raise InputError(f"the chat template refused these messages ({e})") from None
