"""The method's hyperparameters as one record: ``main.py``'s method flags (SPEC 11 #22, 13).

Every field defaults to the paper's value, which stays defined where it is used
(:mod:`core.inference`, :mod:`core.footprint`, :mod:`core.alignment`, :mod:`utils.blur`);
:class:`MethodParams` only carries the values of one run down to those functions, as
keyword arguments. With the defaults every output is byte-identical to a run without the
flags. :data:`FLAGS` holds each flag's help text and what a non-default value changes;
``main.py`` builds its flags from it and the README's table says the same.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from core.alignment import ALIGN_SIGMA, N_ALIGN
from core.footprint import FEATURE_SIDE, SHIFT
from core.inference import K_RGB, K_SDF, N_NONZERO
from utils.blur import BLUR_RADIUS
from utils.errors import ConfigError

#: field -> (type, help). The help says what the value does (SPEC 13).
FLAGS: dict[str, tuple[type, str]] = {
    "k_sdf": (int, "SDF memory neighbours per test patch, the OMP dictionary of SPEC 8.1"),
    "k_rgb": (int, "RGB memory neighbours per foreground cell, the OMP dictionary of SPEC 8.2"),
    "n_nonzero": (int, "OMP non-zero coefficients (atoms), both branches; at most min(k_sdf, k_rgb)"),
    "footprint_shift": (int, "footprint shift in RGB cells (SPEC 5.1); 0: a patch's own cells"),
    "align_samples": (int, "training samples scored for the RGB-to-SDF alignment (SPEC 7)"),
    "align_sigma": (float, "alignment bounds mean -+ align_sigma * std (cancels up to float32 rounding)"),
    "blur_radius": (float, "radius of Pillow's GaussianBlur on the 8-bit maps (SPEC 8.5); 0: no blur"),
    "n_train": (int, "build the memory from N training samples per class: the first N of a permutation "
                     "seeded by --seed (default: all)"),
}


@dataclass(frozen=True)
class MethodParams:
    """One run's hyperparameters (defaults: the paper's); invalid values raise :class:`ConfigError`."""

    k_sdf: int = K_SDF
    k_rgb: int = K_RGB
    n_nonzero: int = N_NONZERO
    footprint_shift: int = SHIFT
    align_samples: int = N_ALIGN
    align_sigma: float = ALIGN_SIGMA
    blur_radius: float = BLUR_RADIUS
    n_train: Optional[int] = None       # None: every training sample

    def __post_init__(self) -> None:
        for name in ("align_sigma", "blur_radius"):   # 4 and 4.0 are the same setting
            object.__setattr__(self, name, float(getattr(self, name)))
        problems = []
        for name in ("k_sdf", "k_rgb", "n_nonzero", "align_samples"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.n_nonzero > min(self.k_sdf, self.k_rgb):
            problems.append(f"--n_nonzero {self.n_nonzero} exceeds the neighbours it codes with "
                            f"(--k_sdf {self.k_sdf}, --k_rgb {self.k_rgb})")
        if not 0 <= self.footprint_shift < FEATURE_SIDE:
            problems.append(f"--footprint_shift must lie in [0, {FEATURE_SIDE - 1}] cells, got {self.footprint_shift}")
        if not (math.isfinite(self.align_sigma) and self.align_sigma > 0):
            problems.append(f"--align_sigma must be a positive number, got {self.align_sigma}")
        if not (math.isfinite(self.blur_radius) and self.blur_radius >= 0):
            problems.append(f"--blur_radius must be >= 0, got {self.blur_radius}")
        if self.n_train is not None and self.n_train < 1:
            problems.append(f"--n_train must be at least 1, got {self.n_train}")
        if problems:
            raise ConfigError("; ".join(problems))

    def predict_options(self) -> dict:
        """The keyword arguments of :func:`core.inference.predict`."""
        return dict(k_sdf=self.k_sdf, k_rgb=self.k_rgb, n_nonzero=self.n_nonzero, blur_radius=self.blur_radius)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def changed(self) -> dict:
        """The fields whose value is not the paper's."""
        default = MethodParams()
        return {k: v for k, v in self.as_dict().items() if getattr(default, k) != v}
