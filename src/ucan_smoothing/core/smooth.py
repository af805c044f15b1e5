"""The smoothed classifier: Cohen et al.'s PREDICT and CERTIFY for any noise.

``Smooth`` wraps any ``torch.nn.Module`` that maps a batch of inputs to
logits. ``certify`` reads like the paper's algorithm:

1. draw ``n0`` noisy copies, take the most voted class ``cA`` (selection);
2. draw ``n`` fresh copies and count the votes for ``cA`` (estimation);
3. ``p_lower`` = one-sided Clopper-Pearson bound at level ``alpha``;
4. abstain if ``p_lower <= 1/2``, else the noise turns ``p_lower`` into the
   certified region.

Noise is drawn on the model's device in batches of ``batch_size`` under
``torch.inference_mode()``; only the vote counts are kept, so memory does
not grow with ``n``. Several images share one forward batch when
``batch_size`` exceeds what one image needs.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .certificate import ABSTAIN, Certificate
from .sequential import certify_radius, predict_sequential
from .streams import resolve_generator
from .statistics import (
    check_alpha,
    check_can_certify,
    check_count,
    clopper_pearson_lower,
    predict_is_significant,
)

class CastInput(torch.nn.Module):
    """``model(z.to(dtype))`` as float32 logits: a reduced-precision model as a base classifier of
    float32 inputs (the rounding of the noisy input is part of the classifier, which keeps the
    certificate sound)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z.to(self.dtype)).float()


class Smooth:
    """A smoothed classifier ``g(x) = argmax_c P(model(x + noise) = c)``.

    ``noise`` is an isotropic family (:mod:`ucan_smoothing.core.noises`) or fixed
    anisotropic noise (:class:`ucan_smoothing.Anisotropic`). The model is put
    in eval mode. ``input_shape`` (optional) is checked against every input.
    Noise is drawn on the model's device, in its dtype, but at least float32:
    a float16 / bfloat16 model gets float32 noisy inputs cast to its dtype.
    A noise too large for that dtype, noisy inputs that overflow it, and NaN
    logits are refused with a ``ValueError`` rather than counted as votes.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int, noise, *, input_shape=None):
        self.model = model.eval()
        self.num_classes = check_count("num_classes", num_classes, minimum=2)
        self.noise = noise
        self.input_shape = None if input_shape is None else tuple(input_shape)
        if self.input_shape is not None:
            noise.check_input_shape(self.input_shape)
        parameter = next(model.parameters(), None)
        self.device = parameter.device if parameter is not None else None
        self.dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else None
        if self.dtype in (torch.float16, torch.bfloat16):
            # Noise drawn in half precision is a coarse grid, not the distribution the certificate
            # assumes: draw and add it in float32, and let the base classifier round its input.
            self.model = CastInput(self.model, self.dtype)
            self.dtype = torch.float32

    # -- input checks ---------------------------------------------------------
    def prepare(self, xs: torch.Tensor, single: bool) -> torch.Tensor:
        """``xs`` checked (shape, finite values) and moved to the model's device and dtype;
        ``single``: one input, returned with a batch dimension."""
        if not isinstance(xs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(xs).__name__}")
        shape = tuple(xs.shape) if single else tuple(xs.shape[1:])
        if not single and xs.dim() < 2:
            raise ValueError(f"a batch of inputs needs shape (batch, *input_shape), got {tuple(xs.shape)}")
        if self.input_shape is not None and shape != self.input_shape:
            hint = " (pass one input without a batch dimension)" if single and shape[1:] == self.input_shape else ""
            raise ValueError(f"input has shape {shape} but this classifier expects {self.input_shape}{hint}")
        if xs.numel() == 0:
            raise ValueError("input is empty")
        if not torch.isfinite(xs).all():
            raise ValueError("input contains NaN or inf")
        self.noise.check_input_shape(shape)
        device = self.device or xs.device
        # A model without parameters takes the input's dtype, but noise is never drawn below float32.
        dtype = self.dtype or (xs.dtype if xs.is_floating_point() else torch.get_default_dtype())
        dtype = torch.promote_types(dtype, torch.float32)
        xs = xs.to(device, dtype)
        return xs[None] if single else xs

    # -- Monte Carlo ------------------------------------------------------------
    def count_votes(self, xs: torch.Tensor, num: int, batch_size: int, generator=None, progress: bool = False):
        """Votes of ``model(x + noise)`` over ``num`` draws for each input in the
        batch ``xs``: a ``(len(xs), num_classes)`` int64 CPU tensor.

        The ``len(xs) * num`` draws are one stream cut into forward batches of
        ``batch_size``, so small ``num`` still fills each batch.
        """
        num = check_count("number of samples", num)
        batch_size = check_count("batch_size", batch_size)
        self.noise.check_dtype(xs.dtype)  # the noise was checked against float32 when made; xs may be wider
        count, shape = xs.shape[0], tuple(xs.shape[1:])
        device, classes = xs.device, self.num_classes
        generator = resolve_generator(generator, device)
        votes = torch.zeros(count * classes, dtype=torch.long, device=device)
        total = count * num
        bar = tqdm(total=total, unit="sample", disable=not progress, leave=False)
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                owner = torch.arange(start, stop, device=device) // num
                noisy = self.noise.sample((stop - start, *shape), generator=generator, device=device, dtype=xs.dtype)
                noisy += xs[0] if count == 1 else xs[owner]
                logits = self.model(noisy)
                if logits.shape != (stop - start, classes):
                    raise ValueError(
                        f"the model returned output of shape {tuple(logits.shape)} for a batch of "
                        f"{stop - start}; expected ({stop - start}, {classes}) logits (num_classes={classes})"
                    )
                self._check_batch(xs, noisy, logits)
                votes += torch.bincount(owner * classes + logits.argmax(dim=1), minlength=count * classes)
                bar.update(stop - start)
        bar.close()
        return votes.view(count, classes).cpu()

    def _check_batch(self, xs, noisy, logits) -> None:
        """Raise if the noisy inputs are not finite (they are then not draws of the noise the
        certificate assumes) or the logits hold NaN (argmax would pick an arbitrary class).
        Infinite logits are kept: an argmax over them is still a decision (log-probabilities
        are often -inf). A sum is finite only if every term is, and costs one fast pass
        (``isfinite(noisy).all()`` is several times slower); it can only err towards refusing
        inputs so large that their sum overflows. One device sync for both checks."""
        noisy_finite, logits_valid = torch.stack(
            (torch.isfinite(noisy.sum()), ~torch.isnan(logits).any())
        ).tolist()
        if noisy_finite and logits_valid:
            return
        where = f"noise {self.noise!r}, inputs in [{float(xs.min()):.4g}, {float(xs.max()):.4g}]"
        if not noisy_finite:
            raise ValueError(
                f"the noisy inputs overflow {noisy.dtype} (inf, NaN or values near its limit; {where}): "
                "the noise cannot be drawn faithfully in this dtype; use a smaller noise scale or a "
                "float64 model (power-law noise: a larger a - dim, its tail overflows at any scale)"
            )
        raise ValueError(
            f"the model returned NaN logits for noisy inputs ({where}); its votes would be "
            "arbitrary, so nothing is certified"
        )

    # -- PREDICT ---------------------------------------------------------------
    def predict_batch(self, xs, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        """Cohen's PREDICT for each input of the batch ``xs``: class or ``ABSTAIN``."""
        return self._predict(self.prepare(xs, single=False), n, alpha, batch_size, generator)

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        """Cohen's PREDICT: the smoothed class of ``x`` (one input), or ``ABSTAIN``.

        A returned class is wrong with probability at most ``alpha``.
        """
        return self._predict(self.prepare(x, single=True), n, alpha, batch_size, generator)[0]

    def _predict(self, xs, n, alpha, batch_size, generator) -> list:
        alpha = check_alpha(alpha)
        votes = self.count_votes(xs, n, batch_size, generator)
        predictions = []
        for row in votes:
            top2 = row.topk(2)
            n_a, n_b = int(top2.values[0]), int(top2.values[1])
            significant = predict_is_significant(n_a, n_b, alpha)
            predictions.append(int(top2.indices[0]) if significant else ABSTAIN)
        return predictions

    # -- CERTIFY ---------------------------------------------------------------
    def certify_batch(
        self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None, progress: bool = False
    ) -> list:
        """Cohen's CERTIFY for each input of the batch ``xs`` (independent noise per input)."""
        return self._certify(self.prepare(xs, single=False), n0, n, alpha, batch_size, generator, progress)

    def certify(
        self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None, progress: bool = False
    ) -> Certificate:
        """Cohen's CERTIFY for one input ``x`` (no batch dimension).

        With probability at least ``1 - alpha`` over the noise, the smoothed
        classifier predicts ``certificate.prediction`` at every ``x + delta``
        with ``certificate.contains(delta)``.
        """
        return self._certify(self.prepare(x, single=True), n0, n, alpha, batch_size, generator, progress)[0]

    def _certify(self, xs, n0, n, alpha, batch_size, generator, progress) -> list:
        alpha = check_alpha(alpha)
        n0 = check_count("n0", n0)
        n = check_count("n", n)
        check_can_certify(n, alpha)
        generator = resolve_generator(generator, xs.device)
        # Selection and estimation use separate samples, as the proof requires.
        selected = self.count_votes(xs, n0, batch_size, generator, progress).argmax(dim=1)
        votes = self.count_votes(xs, n, batch_size, generator, progress)
        input_shape = tuple(xs.shape[1:])
        certificates = []
        for c_a, row in zip(selected.tolist(), votes):
            top_count = int(row[c_a])
            p_lower = clopper_pearson_lower(top_count, n, alpha)
            abstain = p_lower <= 0.5
            certificates.append(
                Certificate(
                    prediction=ABSTAIN if abstain else c_a,
                    p_lower=p_lower,
                    norm=self.noise.primary_norm,
                    regions=() if abstain else tuple(self.noise.regions(p_lower, input_shape)),
                    is_certificate=self.noise.is_certificate,
                    n0=n0,
                    n=n,
                    alpha=alpha,
                    top_count=top_count,
                )
            )
        return certificates

    # -- sequential (fewer samples for a fixed question; see sequential.py) ---------
    def certify_radius(self, x, radius: float, norm, alpha: float, **options):
        """Is ``x`` certified at ``radius`` in ``norm``? Stops as soon as known;
        see :func:`ucan_smoothing.core.sequential.certify_radius` for ``options``."""
        return certify_radius(self, x, radius, norm, alpha, **options)

    def predict_sequential(self, x, alpha: float, **options):
        """PREDICT with early stopping; see :func:`ucan_smoothing.core.sequential.predict_sequential`."""
        return predict_sequential(self, x, alpha, **options)
