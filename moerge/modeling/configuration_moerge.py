"""Configuration of a moerge checkpoint (``model_type: "moerge"``).

This file is copied next to every built checkpoint and loaded as Hugging Face remote code, so it imports only
torch, transformers and the standard library.  See ``docs/FORMAT.md`` for the contract.

A :class:`MoergeConfig` wraps two things:

* ``base_config``: the config of the base causal LM (a dict in ``config.json``; a real config object of the
  base's ``model_type``, built with ``AutoConfig.for_model``, once loaded);
* ``moerge``: the routing plan (experts, level, top_k, router_input, initialized, fallback, units).

``get_text_config()`` returns the base config, so generation (cache set-up, vocab size, special tokens) sees
the base model; a few common attributes (``vocab_size``, ``hidden_size``, ...) are mirrored read/write.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig

AUTO_MAP = {
    "AutoConfig": "configuration_moerge.MoergeConfig",
    "AutoModelForCausalLM": "modeling_moerge.MoergeForCausalLM",
}

# attributes read from (and written to) the base config, for code that looks at `model.config.<name>`
MIRRORED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)


def _mirror(name: str) -> property:
    """A property that forwards ``name`` to the base config (AttributeError when there is none)."""

    def fget(self: MoergeConfig) -> Any:
        base = self.__dict__.get("base_config")
        if base is None:
            raise AttributeError(name)
        return getattr(base, name)

    def fset(self: MoergeConfig, value: Any) -> None:
        base = self.__dict__.get("base_config")
        if base is not None:  # older configs may carry mirrored keys at top level: the base wins
            setattr(base, name, value)

    return property(fget, fset, doc=f"`base_config.{name}`")


def build_base_config(base: dict | PreTrainedConfig) -> PreTrainedConfig:
    """``{"model_type": "llama", ...}`` -> ``LlamaConfig(...)`` (config objects pass through)."""
    if isinstance(base, PreTrainedConfig):
        return base
    fields = dict(base)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("MoergeConfig: base_config has no 'model_type'")
    fields.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **fields)


class MoergeConfig(PreTrainedConfig):
    """Config of ``MoergeForCausalLM``: the wrapped base config plus the routing plan ``moerge``."""

    model_type = "moerge"
    # old-style declaration (a plain class attribute) so that dtype / attn_implementation are propagated to
    # the base config by `from_pretrained`, on every transformers v5 release
    sub_configs: ClassVar[dict] = {"base_config": AutoConfig}

    base_config: dict | PreTrainedConfig | None = None
    moerge: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # the base must be an object before `super().__post_init__`, which walks the sub-configs
        if self.base_config is not None:
            self.base_config = build_base_config(self.base_config)
        super().__post_init__(**kwargs)
        if self.moerge is None:
            self.moerge = {}
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        base = self.base_config
        if base is None:
            return
        self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
        if self.dtype is None:
            self.dtype = base.dtype
        else:
            base.dtype = self.dtype

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The base model's (text) config: what generation and cache preparation need."""
        if self.base_config is None:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def expert_names(self) -> list[str]:
        return list(self.moerge.get("experts", []))



for _name in MIRRORED:  # read/write views on the base config
    setattr(MoergeConfig, _name, _mirror(_name))
del _name


__all__ = ["AUTO_MAP", "MoergeConfig", "build_base_config"]
