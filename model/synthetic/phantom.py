"""Synthetic lumbar spine phantoms in Hounsfield units, benign or malignant fracture.

A phantom is an analytic description (vertebrae, discs, posterior elements, muscles, fat, air,
vessels, and the fracture's features) rendered on any axial grid in LPS millimetres. The
features follow Table 1 of Li et al. (Eur Radiol 2021):

- benign: vertebral compression (wedge or biconcave), a sclerotic transverse fracture line,
  cortical interruption with a small displaced fragment, no mass; sometimes a second
  compressed segment;
- malignant: lytic bone destruction reaching (and breaking) the cortex, a paravertebral
  soft-tissue mass, often compression, sometimes a second destroyed segment.

Everything random comes from one :class:`numpy.random.Generator`, so a seed reproduces a case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Label = Literal["benign", "malignant"]

VERTEBRA_NAMES = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")
AIR_HU = -1000.0
FAT_HU = -100.0


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid (LPS mm) that sets or adds HU inside it."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    mode: Literal["set", "add"] = "set"
    bone_only: bool = False  # "set" only where there is bone (lytic destruction)

    def z_range(self) -> tuple[float, float]:
        return (self.center[2] - self.radii[2], self.center[2] + self.radii[2])


@dataclass(frozen=True)
class Vertebra:
    """One vertebral body and its arch. Endplate deformation describes compression."""

    name: str
    z_bottom: float
    z_top: float
    radius_x: float
    radius_y: float
    wedge_fraction: float = 0.0  # anterior height loss, fraction of the height
    biconcave_fraction: float = 0.0  # central height loss, fraction of the height

    @property
    def height(self) -> float:
        return self.z_top - self.z_bottom


@dataclass(frozen=True)
class FractureLine:
    """A sclerotic transverse band through a vertebral body."""

    vertebra: int
    z_anterior: float
    z_posterior: float
    thickness: float
    hu_added: float


@dataclass(frozen=True)
class CorticalBreak:
    """An interrupted anterior cortex, with a fragment pushed forward."""

    vertebra: int
    z_center: float
    half_height: float
    half_width_x: float
    displacement: float


@dataclass(frozen=True)
class SpinePhantom:
    """A complete synthetic spine: render it on a grid, read its ROI from it."""

    label: Label
    vertebrae: tuple[Vertebra, ...]
    abnormal_index: int
    spine_x: float
    spine_y: float
    curvature_mm: float
    curvature_period_mm: float
    cortical_thickness: float
    cortical_hu: float
    cancellous_hu: float
    trabecular_hu: float
    disc_hu: float
    muscle_hu: float
    vessel_hu: float
    body_half_width: float
    body_half_depth: float
    body_center_y: float
    noise_hu: float
    texture_waves: tuple[tuple[float, float, float, float], ...]
    fracture_lines: tuple[FractureLine, ...] = ()
    cortical_breaks: tuple[CorticalBreak, ...] = ()
    lesions: tuple[Ellipsoid, ...] = ()
    masses: tuple[Ellipsoid, ...] = ()
    gas: tuple[Ellipsoid, ...] = ()
    features: dict[str, bool] = field(default_factory=dict)

    def center_y_at(self, z: np.ndarray) -> np.ndarray:
        """Body centre y (mm) at height z: a gentle lordotic curve."""
        phase = 2.0 * math.pi * np.asarray(z) / self.curvature_period_mm
        return np.asarray(self.spine_y + self.curvature_mm * np.sin(phase))

    def render(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, seed: int) -> np.ndarray:
        """HU (float32) on an axial grid: x, y of shape (rows, columns), z of shape (slices,)."""
        return _render(self, x, y, np.asarray(z, dtype=np.float64), seed)


def _ellipse_rho(dx: np.ndarray, dy: np.ndarray, rx: float, ry: float) -> np.ndarray:
    return np.asarray(np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2))


def _vertebral_body(
    phantom: SpinePhantom,
    vertebra: Vertebra,
    dx: np.ndarray,
    dy: np.ndarray,
    z: np.ndarray,
    texture: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks of the body (inside endplates), its cortex, and the HU of its cancellous core."""
    rho = _ellipse_rho(dx, dy, vertebra.radius_x, vertebra.radius_y)
    # Fraction from posterior wall (0) to anterior wall (1): anterior is smaller y.
    anterior = np.clip((vertebra.radius_y - dy) / (2.0 * vertebra.radius_y), 0.0, 1.0)
    cup = np.clip(1.0 - rho**2, 0.0, 1.0)
    top = vertebra.z_top - vertebra.height * (
        vertebra.wedge_fraction * anterior + 0.5 * vertebra.biconcave_fraction * cup
    )
    bottom = vertebra.z_bottom + vertebra.height * 0.5 * vertebra.biconcave_fraction * cup
    inside_plane = rho <= 1.0
    inside = inside_plane & (z >= bottom) & (z <= top)
    t = phantom.cortical_thickness
    shell_plane = rho >= 1.0 - t / min(vertebra.radius_x, vertebra.radius_y)
    cortex = inside & (shell_plane | (z - bottom < t) | (top - z < t))
    return inside, cortex, phantom.cancellous_hu + texture


def _render(
    phantom: SpinePhantom, x: np.ndarray, y: np.ndarray, z: np.ndarray, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z3 = z[:, None, None]
    x3 = x[None, :, :]
    y3 = y[None, :, :]
    centre_y = phantom.center_y_at(z)[:, None, None]
    dx = x3 - phantom.spine_x
    dy = y3 - centre_y
    shape = (len(z), *x.shape)

    # Torso outline (air outside), fat inside; muscles; vessels.
    torso = (
        _ellipse_rho(
            dx,
            y3 - (centre_y + phantom.body_center_y),
            phantom.body_half_width,
            phantom.body_half_depth,
        )
        <= 1.0
    )
    hu = np.where(torso, FAT_HU, AIR_HU).astype(np.float32)
    hu = np.broadcast_to(hu, shape).copy()
    muscle = np.zeros(shape, dtype=bool)
    r_x = phantom.vertebrae[0].radius_x
    r_y = phantom.vertebrae[0].radius_y
    for side in (-1.0, 1.0):
        muscle |= _ellipse_rho(dx - side * (r_x + 13.0), dy - 2.0, 11.0, 13.0) <= 1.0  # psoas
        muscle |= _ellipse_rho(dx - side * 26.0, dy - (r_y + 38.0), 19.0, 17.0) <= 1.0
    hu[muscle & torso] = phantom.muscle_hu
    hu[(_ellipse_rho(dx - 12.0, dy + r_y + 13.0, 10.0, 10.0) <= 1.0) & torso] = phantom.vessel_hu
    hu[(_ellipse_rho(dx + 16.0, dy + r_y + 11.0, 9.0, 8.0) <= 1.0) & torso] = 40.0
    for bubble in phantom.gas:
        _apply_ellipsoid(hu, bubble, x3, y3, z3, torso)

    texture = np.zeros(shape, dtype=np.float32)
    for kx, ky, kz, phase in phantom.texture_waves:
        in_plane = (kx * x3 + ky * y3).astype(np.float32)
        along = (kz * z3 + phase).astype(np.float32)
        texture += np.cos(in_plane + along)
    texture *= phantom.trabecular_hu / math.sqrt(max(len(phantom.texture_waves), 1))

    bone = np.zeros(shape, dtype=bool)
    for index, vertebra in enumerate(phantom.vertebrae):
        above = phantom.vertebrae[index + 1] if index + 1 < len(phantom.vertebrae) else None
        lower = vertebra.z_bottom - 1.0
        upper = vertebra.z_top + 1.0 if above is None else above.z_bottom + above.height / 2
        ks = np.nonzero((z >= lower) & (z <= upper))[0]
        if len(ks) == 0:
            continue
        sl = slice(int(ks[0]), int(ks[-1]) + 1)
        sub_dx = np.broadcast_to(dx, shape)[sl]
        sub_dy, sub_z = dy[sl], z3[sl]
        _arch(phantom, vertebra, hu[sl], bone[sl], sub_dx, sub_dy, sub_z)
        inside, cortex, core = _vertebral_body(
            phantom, vertebra, sub_dx, sub_dy, sub_z, texture[sl]
        )
        hu[sl] = np.where(inside, core, hu[sl])
        hu[sl] = np.where(cortex, phantom.cortical_hu + 0.3 * texture[sl], hu[sl])
        bone[sl] |= inside
        for line in phantom.fracture_lines:
            if line.vertebra == index:
                _fracture_line(hu[sl], inside, sub_dy, sub_z, vertebra, line)
        for broken in phantom.cortical_breaks:
            if broken.vertebra == index:
                _cortical_break(phantom, hu[sl], bone[sl], sub_dx, sub_dy, sub_z, vertebra, broken)
        if above is not None:
            _disc(phantom, hu[sl], sub_dx, sub_dy, sub_z, vertebra, above)

    for mass in phantom.masses:
        _apply_ellipsoid(hu, mass, x3, y3 - centre_y + phantom.spine_y, z3, torso & ~bone)
    for lesion in phantom.lesions:
        _apply_ellipsoid(hu, lesion, x3, y3 - centre_y + phantom.spine_y, z3, bone)
    hu += rng.normal(0.0, phantom.noise_hu, size=shape).astype(np.float32)
    return hu


def _apply_ellipsoid(
    hu: np.ndarray,
    ellipsoid: Ellipsoid,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    where: np.ndarray,
) -> None:
    cx, cy, cz = ellipsoid.center
    rx, ry, rz = ellipsoid.radii
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0
    mask = inside & np.broadcast_to(where, inside.shape)
    mask = np.broadcast_to(mask, hu.shape)
    if ellipsoid.mode == "set":
        hu[mask] = ellipsoid.hu
    else:
        hu[mask] += ellipsoid.hu


def _arch(
    phantom: SpinePhantom,
    vertebra: Vertebra,
    hu: np.ndarray,
    bone: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    z: np.ndarray,
) -> None:
    """Pedicles, lamina around the canal, spinous and transverse processes (rough)."""
    h = vertebra.height
    level = (z >= vertebra.z_bottom + 0.25 * h) & (z <= vertebra.z_top - 0.05 * h)
    canal_y = vertebra.radius_y + 10.0
    ring = _ellipse_rho(dx, dy - canal_y, 13.0, 11.0)
    arch = (ring <= 1.0) & (ring >= 0.62) & (dy > vertebra.radius_y - 2.0)
    slope = (z - vertebra.z_bottom) / h  # the spinous process slopes down posteriorly
    spinous = (
        (np.abs(dx) <= 3.5)
        & (dy >= canal_y + 8.0)
        & (dy <= canal_y + 8.0 + 24.0 * np.clip(slope + 0.2, 0.0, 1.0))
    )
    transverse = (np.abs(dy - canal_y + 4.0) <= 3.5) & (np.abs(dx) <= vertebra.radius_x + 18.0)
    transverse &= (z >= vertebra.z_bottom + 0.45 * h) & (z <= vertebra.z_top - 0.2 * h)
    element = (arch & level) | (spinous & level) | transverse
    hu[element] = 0.75 * phantom.cortical_hu
    canal = (ring < 0.62) & (dy > vertebra.radius_y)
    hu[canal] = 15.0
    bone |= element


def _fracture_line(
    hu: np.ndarray,
    inside: np.ndarray,
    dy: np.ndarray,
    z: np.ndarray,
    vertebra: Vertebra,
    line: FractureLine,
) -> None:
    anterior = np.clip((vertebra.radius_y - dy) / (2.0 * vertebra.radius_y), 0.0, 1.0)
    z_line = line.z_posterior + (line.z_anterior - line.z_posterior) * anterior
    band = inside & (np.abs(z - z_line) <= line.thickness / 2.0)
    hu[band] += line.hu_added


def _cortical_break(
    phantom: SpinePhantom,
    hu: np.ndarray,
    bone: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    z: np.ndarray,
    vertebra: Vertebra,
    broken: CorticalBreak,
) -> None:
    near_wall = (dy <= -vertebra.radius_y + phantom.cortical_thickness + 1.0) & (
        dy >= -vertebra.radius_y - 0.5
    )
    gap = (
        near_wall
        & (np.abs(dx) <= broken.half_width_x)
        & (np.abs(z - broken.z_center) <= broken.half_height)
    )
    hu[gap] = phantom.cancellous_hu
    # The fragment: a short piece of cortex pushed anteriorly just below the gap.
    fragment = (
        (np.abs(dx) <= broken.half_width_x)
        & (np.abs(dy + vertebra.radius_y + broken.displacement) <= phantom.cortical_thickness)
        & (np.abs(z - broken.z_center + broken.half_height + 1.5) <= 2.0)
    )
    hu[fragment] = phantom.cortical_hu
    bone |= fragment


def _disc(
    phantom: SpinePhantom,
    hu: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    z: np.ndarray,
    lower: Vertebra,
    upper: Vertebra,
) -> None:
    """Disc between two bodies; it fills any space a compressed endplate leaves."""
    rho = _ellipse_rho(dx, dy, lower.radius_x * 0.97, lower.radius_y * 0.97)
    span = lower.height * (lower.wedge_fraction + 0.5 * lower.biconcave_fraction)
    rise = upper.height * 0.5 * upper.biconcave_fraction
    between = (z > lower.z_top - span - 0.01) & (z < upper.z_bottom + rise + 0.01)
    body_top = (
        lower.z_top
        - lower.height
        * lower.wedge_fraction
        * np.clip((lower.radius_y - dy) / (2.0 * lower.radius_y), 0.0, 1.0)
        - 0.5 * lower.height * lower.biconcave_fraction * np.clip(1.0 - rho**2, 0.0, 1.0)
    )
    disc = (rho <= 1.0) & between & (z > body_top)
    hu[disc] = phantom.disc_hu
