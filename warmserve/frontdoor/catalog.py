"""What the front door needs to know about each model beyond the registry: its context length
(to bound ``max_tokens``) and its chat template (to turn ``messages`` into a prompt).

Both come from the files beside the weights (``config.json``, ``tokenizer_config.json``), read once
per model on first use. The chat template is rendered here rather than on the worker so the
request that reaches the engine is plain text, the same for both endpoints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property

from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        """Tokens the model can attend to: prompt plus completion must fit."""
        value = self._read("config.json").get("max_position_embeddings")
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT

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
