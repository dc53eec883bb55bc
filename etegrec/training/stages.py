"""Every stage of the package, registered once, in pipeline order (each after the stages it needs).

``python -m etegrec`` lists their commands from here. A new stage is one file declaring its
:class:`~etegrec.training.stage.Stage` (see docs/architecture.md) and its line below.
"""
from __future__ import annotations

from .embed import EMBED
from .joint import JOINT
from .rqvae import RQVAE
from .stage import Stage

__all__ = ["STAGES", "Stage"]

STAGES: tuple[Stage, ...] = (EMBED, RQVAE, JOINT)
