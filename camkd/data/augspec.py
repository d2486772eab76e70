"""What makes a set of training views (:class:`AugSpec`): the vocabulary a split, the store and the loop share.

A split hands out its spec (``DataSplit.aug_spec``), the store records it (``aug`` in its attrs) and a reader
rebuilds it, without any of them knowing how a recipe draws its parameters (``views.py``, ``rrc.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from camkd.data.norm import Normalization

# The 32-px recipe's name as stores record it (views.py implements it): the defaults of AugSpec are that recipe's.
CROP_RECIPE = "crop-pad4-zero+hflip0.5+normalize"


@dataclass(frozen=True)
class AugSpec:
    """What makes a set of views: the seed, the recipe, the padding and the normalization."""

    seed: int
    norm: Normalization
    padding: int = 4
    recipe: str = CROP_RECIPE

    def to_dict(self) -> dict:
        return {"seed": self.seed, "recipe": self.recipe, "padding": self.padding, "normalization": self.norm.to_dict()}
