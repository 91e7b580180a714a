"""Random design of a :class:`SpinePhantom` and of the ROI a radiologist would draw on it.

Feature frequencies follow Table 1 of Li et al. (malignant vs benign): soft-tissue mass 93% vs
1.5%; bone destruction 99% vs 1%; transverse fracture line 1% vs 80%; compression 85% vs
97%; cortex interruption 98% vs 91%; multiple segments 54% vs 22%.
"""

from __future__ import annotations

import math

import numpy as np

from model.synthetic.phantom import (
    VERTEBRA_NAMES,
    CorticalBreak,
    Ellipsoid,
    FractureLine,
    Label,
    SpinePhantom,
    Vertebra,
)

# Room (mm) kept between the ROI's box and the series' first and last slice.
ROI_Z_CLEARANCE_MM = 4.0
SLICE_STEP_MM = 3.0


def _column(
    rng: np.random.Generator, z_low: float, z_high: float, radius_x: float, radius_y: float
) -> list[Vertebra]:
    """Vertebrae (with discs between) covering [z_low, z_high], named from the top down."""
    heights: list[tuple[float, float]] = []
    z = z_low - rng.uniform(0.0, 20.0)
    while z < z_high + 5.0:
        height = rng.uniform(20.0, 27.0)
        disc = rng.uniform(6.0, 10.0)
        heights.append((z, z + height))
        z += height + disc
    top_name = int(rng.integers(0, max(1, len(VERTEBRA_NAMES) - len(heights) + 1)))
    vertebrae = []
    for i, (bottom, top) in enumerate(heights):
        # Superior vertebrae have larger z; the topmost gets the first name.
        position = len(heights) - 1 - i + top_name
        name = VERTEBRA_NAMES[position] if position < len(VERTEBRA_NAMES) else f"V{position}"
        scale = 1.0 + 0.02 * (len(heights) - 1 - i)
        vertebrae.append(
            Vertebra(
                name=name,
                z_bottom=bottom,
                z_top=top,
                radius_x=radius_x * (1.0 + 0.1 * (2 - scale)),
                radius_y=radius_y,
            )
        )
    return vertebrae


def _compress(vertebra: Vertebra, rng: np.random.Generator, strength: float) -> Vertebra:
    wedge = rng.random() < 0.6
    amount = strength * rng.uniform(0.5, 1.0)
    return Vertebra(
        name=vertebra.name,
        z_bottom=vertebra.z_bottom,
        z_top=vertebra.z_top,
        radius_x=vertebra.radius_x,
        radius_y=vertebra.radius_y,
        wedge_fraction=amount if wedge else 0.0,
        biconcave_fraction=0.0 if wedge else amount,
    )


def _lytic_lesion(
    vertebra: Vertebra, rng: np.random.Generator, spine: tuple[float, float], reach_cortex: bool
) -> tuple[Ellipsoid, str]:
    """A soft-tissue ellipsoid replacing bone; when ``reach_cortex`` it breaks through a wall."""
    h = vertebra.height
    radii = (rng.uniform(8.0, 13.0), rng.uniform(6.5, 11.0), rng.uniform(0.3, 0.45) * h)
    side = str(rng.choice(["anterior", "anterior", "left", "right", "posterior"]))
    cx, cy = rng.uniform(-0.3, 0.3) * vertebra.radius_x, rng.uniform(-0.3, 0.3) * vertebra.radius_y
    overshoot = rng.uniform(1.0, 4.0)
    if reach_cortex:
        if side == "anterior":
            cy = -vertebra.radius_y - overshoot + radii[1]
        elif side == "posterior":
            cy = vertebra.radius_y + overshoot - radii[1]
        elif side == "left":  # patient's left is +x in LPS
            cx = vertebra.radius_x + overshoot - radii[0]
        else:
            cx = -vertebra.radius_x - overshoot + radii[0]
    cz = (vertebra.z_bottom + vertebra.z_top) / 2.0 + rng.uniform(-0.15, 0.15) * h
    lesion = Ellipsoid(
        center=(spine[0] + cx, spine[1] + cy, cz),
        radii=radii,
        hu=rng.uniform(15.0, 65.0),
        mode="set",
        bone_only=True,
    )
    return lesion, side


def _mass(
    vertebra: Vertebra,
    rng: np.random.Generator,
    spine: tuple[float, float],
    side: str,
    lesion: Ellipsoid,
) -> Ellipsoid:
    """A paravertebral soft-tissue mass next to the destroyed wall."""
    h = vertebra.height
    radii = (rng.uniform(11.0, 22.0), rng.uniform(6.0, 12.0), rng.uniform(0.45, 0.8) * h)
    if side in ("anterior", "left", "right"):
        # Anterior or anterolateral: it shows on the midline sagittal slabs.
        cx = lesion.center[0] - spine[0] + rng.uniform(-4.0, 4.0)
        cy = -vertebra.radius_y - radii[1] * rng.uniform(0.3, 0.7)
    else:  # epidural / posterior extension into the canal
        cx = lesion.center[0] - spine[0]
        cy = vertebra.radius_y + radii[1] * rng.uniform(0.3, 0.6)
        radii = (radii[0] * 0.6, radii[1] * 0.7, radii[2])
    return Ellipsoid(
        center=(spine[0] + cx, spine[1] + cy, lesion.center[2] + rng.uniform(-3.0, 3.0)),
        radii=radii,
        hu=rng.uniform(30.0, 60.0),
        mode="set",
    )


def _pick_abnormal(vertebrae: list[Vertebra], z_low: float, z_high: float) -> int:
    """A vertebra whose ROI box (with room) lies inside the series."""
    candidates = []
    for i, v in enumerate(vertebrae):
        centre = (v.z_bottom + v.z_top) / 2.0
        reach = max(v.height, 2.0 * v.radius_y + 26.0) / 2.0 + ROI_Z_CLEARANCE_MM + 2.0
        if centre - reach >= z_low and centre + reach <= z_high:
            candidates.append(i)
    if not candidates:
        raise ValueError(
            f"the series covers {z_high - z_low:.0f} mm: too short for a vertebra and its ROI; "
            "use more slices or a larger slice spacing"
        )
    middle = (z_low + z_high) / 2.0
    return min(
        candidates, key=lambda i: abs((vertebrae[i].z_bottom + vertebrae[i].z_top) / 2 - middle)
    )


def design_phantom(
    rng: np.random.Generator, label: Label, z_low: float, z_high: float
) -> SpinePhantom:
    """A random spine covering z ∈ [z_low, z_high] with a ``label`` fracture in its middle."""
    radius_x, radius_y = rng.uniform(18.0, 23.0), rng.uniform(13.0, 16.5)
    spine = (rng.uniform(-3.0, 3.0), rng.uniform(-3.0, 3.0))
    vertebrae = _column(rng, z_low, z_high, radius_x, radius_y)
    abnormal = _pick_abnormal(vertebrae, z_low, z_high)
    features = {
        "compression": False,
        "fracture_line": False,
        "cortex_interruption": False,
        "bone_destruction": False,
        "soft_tissue_mass": False,
        "multiple_segments": False,
    }
    lines: list[FractureLine] = []
    breaks: list[CorticalBreak] = []
    lesions: list[Ellipsoid] = []
    masses: list[Ellipsoid] = []
    neighbours = [i for i in (abnormal - 1, abnormal + 1) if 0 <= i < len(vertebrae)]
    if label == "malignant":
        if rng.random() < 0.85:
            vertebrae[abnormal] = _compress(vertebrae[abnormal], rng, 0.35)
            features["compression"] = True
        lesion, side = _lytic_lesion(vertebrae[abnormal], rng, spine, reach_cortex=True)
        lesions.append(lesion)
        features["bone_destruction"] = features["cortex_interruption"] = True
        if rng.random() < 0.5:
            extra, _ = _lytic_lesion(vertebrae[abnormal], rng, spine, reach_cortex=False)
            lesions.append(extra)
        if rng.random() < 0.93:
            masses.append(_mass(vertebrae[abnormal], rng, spine, side, lesion))
            features["soft_tissue_mass"] = True
        if neighbours and rng.random() < 0.54:
            other = int(rng.choice(neighbours))
            lesions.append(_lytic_lesion(vertebrae[other], rng, spine, rng.random() < 0.5)[0])
            features["multiple_segments"] = True
    else:
        if rng.random() < 0.97:
            vertebrae[abnormal] = _compress(vertebrae[abnormal], rng, 0.45)
            features["compression"] = True
        v = vertebrae[abnormal]
        below_top = rng.uniform(3.0, 7.0)
        z_posterior = v.z_top - v.height * 0.5 * v.biconcave_fraction - below_top
        z_anterior = v.z_top - v.height * v.wedge_fraction - below_top + rng.uniform(-2.0, 2.0)
        if rng.random() < 0.8:
            lines.append(
                FractureLine(
                    vertebra=abnormal,
                    z_anterior=z_anterior,
                    z_posterior=z_posterior,
                    thickness=rng.uniform(2.0, 4.0),
                    hu_added=rng.uniform(300.0, 550.0),
                )
            )
            features["fracture_line"] = True
        if rng.random() < 0.91:
            breaks.append(
                CorticalBreak(
                    vertebra=abnormal,
                    z_center=z_anterior,
                    half_height=rng.uniform(1.5, 3.0),
                    half_width_x=rng.uniform(5.0, 12.0),
                    displacement=rng.uniform(1.5, 3.0),
                )
            )
            features["cortex_interruption"] = True
        if neighbours and rng.random() < 0.22:
            other = int(rng.choice(neighbours))
            vertebrae[other] = _compress(vertebrae[other], rng, 0.2)
            features["multiple_segments"] = True
    gas = tuple(
        Ellipsoid(
            center=(
                rng.uniform(-40.0, 40.0),
                spine[1] - radius_y - rng.uniform(35.0, 60.0),
                rng.uniform(z_low, z_high),
            ),
            radii=(rng.uniform(4.0, 12.0), rng.uniform(3.0, 8.0), rng.uniform(5.0, 15.0)),
            hu=-900.0,
        )
        for _ in range(int(rng.integers(0, 4)))
    )
    waves = []
    for _ in range(8):
        wavelength = rng.uniform(2.5, 6.0)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2.0 * math.pi / wavelength * direction
        waves.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * math.pi))))
    return SpinePhantom(
        label=label,
        vertebrae=tuple(vertebrae),
        abnormal_index=abnormal,
        spine_x=spine[0],
        spine_y=spine[1],
        curvature_mm=rng.uniform(0.0, 6.0),
        curvature_period_mm=rng.uniform(300.0, 500.0),
        cortical_thickness=rng.uniform(1.0, 1.8),
        cortical_hu=rng.uniform(650.0, 1000.0),
        cancellous_hu=rng.uniform(140.0, 260.0),
        trabecular_hu=rng.uniform(30.0, 70.0),
        disc_hu=rng.uniform(70.0, 100.0),
        muscle_hu=rng.uniform(40.0, 60.0),
        vessel_hu=rng.uniform(35.0, 50.0) if rng.random() < 0.6 else rng.uniform(150.0, 250.0),
        body_half_width=rng.uniform(140.0, 170.0),
        body_half_depth=rng.uniform(120.0, 140.0),
        body_center_y=rng.uniform(-radius_y - 35.0, -radius_y - 20.0),
        noise_hu=rng.uniform(8.0, 25.0),
        texture_waves=tuple(waves),
        fracture_lines=tuple(lines),
        cortical_breaks=tuple(breaks),
        lesions=tuple(lesions),
        masses=tuple(masses),
        gas=gas,
        features=features,
    )


def design_roi(
    phantom: SpinePhantom, rng: np.random.Generator
) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
    """The radiologist's ROI on the abnormal vertebra: slice positions x and a y–z polygon."""
    v = phantom.vertebrae[phantom.abnormal_index]
    centre_z = (v.z_bottom + v.z_top) / 2.0
    centre_y = float(phantom.center_y_at(np.array(centre_z)))
    if phantom.lesions:
        lesion_x = phantom.lesions[0].center[0] - phantom.spine_x
        centre_x = phantom.spine_x + float(np.clip(lesion_x, -v.radius_x / 3, v.radius_x / 3))
    else:
        centre_x = phantom.spine_x + rng.uniform(-3.0, 3.0)
    count = int(rng.integers(3, 6))
    xs = tuple(round(centre_x + (i - (count - 1) / 2.0) * SLICE_STEP_MM, 2) for i in range(count))
    pad = rng.uniform(1.5, 4.0)
    y_front = -v.radius_y - pad
    for mass in phantom.masses:
        if mass.center[1] - phantom.spine_y < 0:
            y_front = min(y_front, mass.center[1] - phantom.spine_y - mass.radii[1] - 1.0)
    y_back = v.radius_y + pad
    z_bottom, z_top = v.z_bottom - pad, v.z_top + pad
    corners = [(y_front, z_top), (y_back, z_top), (y_back, z_bottom), (y_front, z_bottom)]
    polygon = tuple(
        (round(centre_y + y + rng.uniform(-1.0, 1.0), 2), round(z + rng.uniform(-1.0, 1.0), 2))
        for y, z in corners
    )
    return xs, polygon
