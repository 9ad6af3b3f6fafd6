"""moerge: turn several fine-tunes of one base model into a routed Mixture-of-Experts checkpoint.

Python API (the CLI is a thin layer over it)::

    import moerge
    recipe = moerge.load_recipe("recipe.yaml", overrides=["merge.density=0.5"])
    moerge.build(recipe, "out/")

Importing moerge registers the ``moerge`` model type with transformers' Auto classes, so built checkpoints
load with ``AutoModelForCausalLM.from_pretrained(out)`` without ``trust_remote_code``.
"""

from __future__ import annotations

from .errors import MoergeError
from .modeling import register
from .pipeline import build
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["MoergeError", "Recipe", "__version__", "build", "load_recipe", "register"]

register()
