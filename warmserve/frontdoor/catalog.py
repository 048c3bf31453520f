"""What the front door needs to know about each model beyond the registry: the context an
engine serves it with (to bound prompt plus ``max_tokens``), its tokenizer (to count a prompt's
tokens as the engine will) and its chat template (to turn ``messages`` into a prompt).

They come from the files beside the weights (``config.json``, ``tokenizer.json``,
``tokenizer_config.json``), read once per model on first use, and from
``warmserve.engine.max-model-len``, the context the workers start engines with: a model may
attend to more (``max_position_embeddings``), but a request longer than its engine serves would
only fail on the worker. The chat template is rendered here rather than on the worker so the
request that reaches the engine is plain text, the same for both endpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from warmserve import __version__, config
from warmserve.registry import ModelSpec, Registry

logger = logging.getLogger(__name__)

# Used when a model folder has no config.json (a registry entry without local files).
DEFAULT_CONTEXT = 2048
# Used when a model has no chat template of its own: one turn per line, then the assistant tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class ModelInfo:
    """One servable model as the front door sees it."""

    spec: ModelSpec

    def _read(self, name: str) -> dict:
        path = os.path.join(self.spec.path, name)
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            logger.debug("no readable %s for %s", path, self.spec.name)
            return {}
        return doc if isinstance(doc, dict) else {}

    @cached_property
    def context(self) -> int:
        """Tokens an engine serves this model with: prompt plus completion must fit."""
        value = self._read("config.json").get("max_position_embeddings")
        model = int(value) if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT
        return min(model, int(config.get("engine.max-model-len")))

    @cached_property
    def fingerprint(self) -> str:
        """The ``system_fingerprint`` of this model's answers: it changes with WarmServe's
        version and the model's config, as vLLM's (its version and config hash) does."""
        config_text = json.dumps(self._read("config.json"), sort_keys=True)
        digest = hashlib.sha256(f"{self.spec.name}\n{config_text}".encode()).hexdigest()
        return f"warmserve-{__version__}-{digest[:8]}"

    @cached_property
    def vocab(self) -> int | None:
        """Number of token ids the model knows (a prompt of ids must stay below it)."""
        value = self._read("config.json").get("vocab_size")
        return int(value) if isinstance(value, int) and value > 0 else None

    @cached_property
    def _tokenizer(self) -> Tokenizer | None:
        try:
            return Tokenizer.from_file(os.path.join(self.spec.path, "tokenizer.json"))
        except Exception:  # no file, or one this tokenizers version cannot read
            logger.debug("no usable tokenizer.json for %s", self.spec.name)
            return None

    @cached_property
    def _token_bounds(self) -> tuple[int, int]:
        """(tokens the tokenizer adds around a prompt, bytes of its longest token)."""
        tok = self._tokenizer
        assert tok is not None
        added = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0
        return added, max((len(piece) for piece in tok.get_vocab()), default=1)

    def prompt_tokens(self, text: str, room: int, special: bool = True) -> int | None:
        """The tokens the engine will count for ``text`` (with the special tokens the tokenizer
        adds if ``special``); a bound of them where bytes alone decide: at most ``room`` when
        they surely fit in it, more than the context when they surely exceed it. None without
        a tokenizer.

        Tokenizing costs tens of microseconds for a short prompt but seconds for a megabyte, so
        it is skipped where bytes decide: every token of a byte-level tokenizer covers at least
        one byte and at most its longest piece.
        """
        if self._tokenizer is None:
            return None
        added, longest = self._token_bounds
        added = added if special else 0
        size = len(text.encode("utf-8"))
        if size + added <= room:
            return size + added
        if size > (self.context + 1) * longest:
            return size // longest
        return len(self._tokenizer.encode(text, add_special_tokens=special).ids)

    @cached_property
    def _tokenizer_config(self) -> dict:
        return self._read("tokenizer_config.json")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for ``messages``, ending where the assistant's reply begins."""
        cfg = self._tokenizer_config
        source = cfg.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        template = _jinja.from_string(source)
        return template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=cfg.get("bos_token") or "",
            eos_token=cfg.get("eos_token") or "",
        )


class Catalog:
    """The models a front door serves, by name."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._info = {name: ModelInfo(spec) for name, spec in registry.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __getitem__(self, name: str) -> ModelInfo:
        return self._info[name]

    def names(self) -> list[str]:
        return list(self._info)
