"""The blog's step: add a multiple of the target's template, x + a * W[t].

Karpathy, "Breaking Linear Classifiers on ImageNet" (2015): the gradient of class t's score with
respect to the image is W[t], so adding a little of the class template makes the model say t.
"""

from __future__ import annotations

from attacks.methods.base import StepAttack
from attacks.methods.linear import LinearModel
from common.schema import TEMPLATE_RES


class Template(StepAttack):
    r"""Template step: the stored image ``clip(round(x + a * W[t] / max|W[t]|), 0, 255)``.

    Distance measure: L-inf of the unclipped step, in pixel levels: ``a`` (the strength) moves the
    template's largest pixel by ``a`` levels. Value range: uint8 pixels 0..255 in and out.
    The smallest ``a`` on a 1/8-level grid: exact on the linear model in O(C) per pair from the
    Gram matrix ``W W^T`` (computed once), then verified on the stored uint8 image and raised by
    search where rounding or clipping make it fail; ``a - 1/8`` does not pass.

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major.

    Examples::
        >>> attack = Template(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "template"
    res = TEMPLATE_RES

    def __init__(self, model: LinearModel, confidence: float | None = None):
        super().__init__(model, confidence)
        self.scale = model.W.abs().amax(1).clamp(min=1e-30)  # (C,) max |W[t]|

    def direction(self, X, S, targets):
        d = self.model.W[targets] / self.scale[targets, None]  # (T, D) unit-L-inf templates
        g = self.model.fact("gram")[targets] / self.scale[targets, None]  # (T, C) = W d, no matmul
        return d.repeat(len(X), 1), g.repeat(len(X), 1)  # image-major pairs: (N*T, ...)

