"""Procedural chest-radiograph phantoms: the embedded, offline default dataset.

Every example is a pure function of ``(index, seed, size)``: a frontal chest
radiograph drawn from a handful of analytic shapes (body, lungs, heart,
mediastinum/spine, ribs, clavicles, diaphragm) plus six findings whose geometry
is known exactly, so classification, segmentation, localisation and
label-efficiency code all have ground truth without downloading anything.

Conventions
-----------
* Radiological display: bright = dense, patient's right on the image LEFT, so
  the heart bulges towards the image right (patient's left).
* All geometry lives in *normalised anatomical coordinates* ``(a, b)`` in
  [0, 1] (a: left->right, b: top->bottom). A per-image similarity transform
  (scale, a few degrees of rotation, shift) maps them to normalised image
  coordinates ``(u, v)``; rendering at any ``size`` only changes the sampling
  grid. Labels, geometry and boxes therefore do not depend on ``size``.
* Randomness: geometry/labels come from ``default_rng([seed, index])``; pixel
  noise from an independent ``default_rng([seed, index, 1])``. No global RNG.
* Boxes are in continuous pixel coordinates of the rendered image (pixel ``i``
  covers ``[i, i + 1)``), rows ``(class_index, x0, y0, x1, y1)``.

See docs/phantom.md for the choice of contrasts and prevalences.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

FINDINGS: tuple[str, ...] = (
    'cardiomegaly',
    'effusion',
    'nodule',
    'pneumothorax',
    'consolidation',
    'foreign_object',
)
SEG_CLASSES: tuple[str, ...] = ('background', 'lung', 'heart')
MAX_BOXES: int = 8

# Independent Bernoulli prevalence of each finding (same order as FINDINGS).
PREVALENCE: dict[str, float] = {
    'cardiomegaly': 0.20,
    'effusion': 0.20,
    'nodule': 0.22,
    'pneumothorax': 0.16,
    'consolidation': 0.20,
    'foreign_object': 0.25,
}
AP_FRACTION: float = 0.30
MIN_SIZE: int = 16
MAX_SIZE: int = 4096
# Splits are disjoint index ranges of the same (seed) stream, so ids never collide.
SPLIT_OFFSETS: dict[str, int] = {'train': 0, 'val': 1_000_000_000, 'test': 2_000_000_000}
SPLIT_CAPACITY: int = 1_000_000_000

_PREV = np.array([PREVALENCE[f] for f in FINDINGS])
_F32 = np.float32


# --------------------------------------------------------------------------- #
# Small numeric helpers (all float32, all vectorised).
# --------------------------------------------------------------------------- #
def _c01(x):
    """clip(x, 0, 1) via ufuncs (np.clip's Python wrapper dominates on small images)."""
    return np.minimum(np.maximum(x, 0.0), 1.0)


def _sstep(x):
    """Smoothstep on [0, 1] (clipped)."""
    x = _c01(x)
    return x * x * (3.0 - 2.0 * x)


def _ramp(margin, px):
    """Anti-aliased inside-indicator from a signed distance (1-pixel ramp)."""
    return _c01(margin * (1.0 / px) + 0.5)


def _line(dist, sigma, px):
    """Thin bright line of Gaussian profile, never thinner than ~0.6 px.

    Keeping the integral constant when the line is widened stops sub-pixel
    wires from vanishing (or aliasing) at small sizes.
    """
    s = max(sigma, 0.6 * px)
    return np.exp(-np.square(dist * (1.0 / s))) * (sigma / s)


@functools.lru_cache(maxsize=64)
def _rbf_basis(size: int, k: int) -> np.ndarray:
    """[size, k] partition-of-unity Gaussian basis: smooth fields as B @ G @ B.T.

    The field is defined by a k x k random grid in normalised coordinates, so
    the same grid gives the same (smooth) picture at every size.
    """
    u = (np.arange(size) + 0.5) / size
    c = (np.arange(k) + 0.5) / k
    w = np.exp(-np.square((u[:, None] - c[None, :]) * (k / 1.1)))
    w = (w / w.sum(axis=1, keepdims=True)).astype(_F32)
    w.setflags(write=False)  # shared through the cache
    return w


def _smooth_field(grid: np.ndarray, size: int) -> np.ndarray:
    b = _rbf_basis(size, grid.shape[0])
    return b @ grid.astype(_F32) @ b.T


# --------------------------------------------------------------------------- #
# Case sampling: everything that does not depend on the output size.
# --------------------------------------------------------------------------- #
def _check_index(index: Any, name: str = 'index') -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ValueError(f'{name} must be a non-negative integer, got {index!r}')
    if index < 0:
        raise ValueError(f'{name} must be a non-negative integer, got {index}')
    return int(index)


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f'size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}')
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f'size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size}')
    return int(size)


class _Lung:
    """One lung in side-local coordinates q = side * (a - mid) (q > 0 lateral).

    The lung is the intersection of four half-spaces bounded by smooth curves:
    an apical parabola, a medial edge, a convex lateral edge and the
    diaphragmatic dome. Each margin is divided by its gradient norm so that
    min(margins) approximates a signed distance (positive inside).
    """

    def __init__(self, rng: np.random.Generator, side: int, mid: float, common: dict):
        self.side = side
        self.mid = mid
        left = side > 0  # patient's left lung (image right), beside the heart
        self.qm = (0.048 if left else 0.038) + rng.normal(0, 0.004)
        self.va = common['va'] + rng.normal(0, 0.006)
        self.qa = self.qm + 0.055 + rng.normal(0, 0.008)
        self.ka = 4.5 + rng.normal(0, 0.6)
        self.W = common['W'] + rng.normal(0, 0.006)
        # The right hemidiaphragm usually sits a little higher (the liver).
        self.vcp = common['vcp'] + (0.018 if left else 0.0) + rng.normal(0, 0.008)
        self.Hd = 0.07 + rng.normal(0, 0.012)
        self.wp = 0.42 + rng.normal(0, 0.05)
        self.vw = self.vcp - 0.11 + rng.normal(0, 0.015)
        self.qtop = self.qa + 0.06 + rng.normal(0, 0.01)
        # Mediastinal contour bumps (side-local q offsets): left = aortic knob and
        # pulmonary trunk; right = superior vena cava / right hilum.
        self.knob = (0.03 + rng.normal(0, 0.006)) if left else 0.0
        self.vknob = common['va'] + 0.16 + rng.normal(0, 0.012)
        self.trunk = 0.03 + rng.normal(0, 0.005)
        self.vtrunk = self.vknob + 0.085 + rng.normal(0, 0.01)
        self.heart = None  # set once the heart is sampled

    def q(self, a):
        return (a - self.mid) * self.side

    def base(self, q):
        """Diaphragm dome level (b) as a function of q, and its slope."""
        span = self.W - self.qm
        w = np.minimum(np.maximum((q - self.qm) * (1.0 / span), -0.3), 1.3)
        z = (w - self.wp) * (1.0 / (1.0 - self.wp))
        return self.vcp - self.Hd * (1.0 - z * z), self.Hd * 2.0 * z / ((1.0 - self.wp) * span)

    def lateral(self, b):
        """Lateral edge q_l(b) and dq_l/db (convex, widest near the base)."""
        L = self.vw - self.va
        t = _c01((b - self.va) * (1.0 / L))
        omt = 1.0 - t
        return self.W - (self.W - self.qtop) * omt * omt, 2.0 * (self.W - self.qtop) * omt / L

    def medial(self, b):
        # Superior mediastinum (great vessels) is wider than the gap at heart level.
        m = self.qm + 0.03 * (1.0 - _sstep((b - self.va) * (1.0 / 0.3)))
        m = m + self.trunk * np.exp(-np.square((b - self.vtrunk) * (1.0 / 0.05)))
        if self.knob:
            m = m + self.knob * np.exp(-np.square((b - self.vknob) * (1.0 / 0.032)))
        if self.heart is not None:  # the cardiac border is this lung's medial edge
            m = np.maximum(m, self.heart.extents(b)[1 if self.side > 0 else 0])
        return m

    def margins(self, a, b, *, shrink_lat=0.0, shrink_apex=0.0):
        """(apex, medial, lateral, base) margins; shrink_* move the edges inwards."""
        q = self.q(a)
        dq = q - self.qa
        m_apex = (b - self.va - shrink_apex - self.ka * dq * dq) / np.sqrt(
            1.0 + np.square(2.0 * self.ka * dq))
        m_med = q - self.medial(b)
        ql, dql = self.lateral(b)
        m_lat = (ql - shrink_lat - q) / np.sqrt(1.0 + dql * dql)
        vb, dvb = self.base(q)
        m_base = (vb - b) / np.sqrt(1.0 + dvb * dvb)
        return m_apex, m_med, m_lat, m_base

    def margin(self, a, b):
        m = self.margins(a, b)
        return np.minimum(np.minimum(m[0], m[1]), np.minimum(m[2], m[3]))

    def bounds(self):
        """Generous anatomical bounding box (a0, b0, a1, b1) of this lung."""
        qs = (self.qm - 0.01, self.W + 0.01)
        a_vals = [self.mid + self.side * q for q in qs]
        return min(a_vals), self.va - 0.01, max(a_vals), self.vcp + 0.01


class _Heart:
    """Cardiac silhouette as per-row extents either side of the midline.

    Rows run from ``b_top`` (hidden inside the mediastinum, below the
    pulmonary trunk) to ``b_bot`` (below the left dome, hidden in the
    abdomen). The right border (image left, right atrium) reaches its maximum
    early; the left border (left ventricle) bulges lower down; both round off
    towards the bottom. The lungs' medial edges follow these borders, so the
    heart displaces the medial left lung and its border against lung is sharp.
    """

    def __init__(self, mid, b_top, b_bot, tR, tL, fr):
        self.mid, self.b_top, self.b_bot, self.tR, self.tL = mid, b_top, b_bot, tR, tL
        self.RA, self.LV = fr, 1.0 - fr

    @staticmethod
    def _g(t, tm):
        rise = np.sqrt(np.sin((0.5 * np.pi / tm) * np.minimum(np.maximum(t, 0.0), tm)))
        return rise * np.sqrt(_c01((1.0 - t) * (1.0 / 0.22)))

    def set_width(self, width):
        """Scale both borders so that max_row(hR + hL) == width (the CTR numerator)."""
        t = np.linspace(0.0, 1.0, 257)
        w0 = float(np.max(self.RA * self._g(t, self.tR) + self.LV * self._g(t, self.tL)))
        k = width / w0
        self.RA *= k
        self.LV *= k

    def t(self, b):
        return (b - self.b_top) * (1.0 / (self.b_bot - self.b_top))

    def extents(self, b):
        """(hR, hL): heart half-extents right/left of the midline; 0 outside its rows."""
        t = self.t(b)
        rows = (t >= 0.0) & (t <= 1.0)
        return (np.where(rows, self.RA * self._g(t, self.tR), 0.0),
                np.where(rows, self.LV * self._g(t, self.tL), 0.0))

    def render(self, a, b):
        """(mask, density) in one pass: a rounded (cylinder-like) profile across
        each row, fading into the mediastinum over the top quarter."""
        t = self.t(b)
        rows = (t >= 0.0) & (t <= 1.0)
        hR = self.RA * self._g(t, self.tR)
        hL = self.LV * self._g(t, self.tL)
        x = a - self.mid
        mask = (x >= -hR) & (x <= hL) & rows
        half = 0.5 * (hR + hL) + 1e-4
        z = (x - 0.5 * (hL - hR)) * (1.0 / half)
        thk = np.sqrt(np.maximum(1.0 - z * z, 0.0)) * _sstep(t * 4.0) * rows
        return mask, thk


def _draw_labels(rng: np.random.Generator) -> np.ndarray:
    """The first draws of a case's stream: one Bernoulli(PREVALENCE) per finding (bool [K]).

    Shared by `_sample_case` and `case_labels`, so the cheap label-only path can never
    disagree with what `render` draws.
    """
    return rng.random(len(FINDINGS)) < _PREV


def _sample_case(index: int, seed: int) -> dict:
    """Draw every size-independent quantity of one example."""
    rng = np.random.default_rng([seed, index])
    labels = _draw_labels(rng)
    ap = bool(rng.random() < AP_FRACTION)
    C: dict[str, Any] = {'labels': labels.astype(np.float32), 'view': 'AP' if ap else 'PA'}

    # Global pose: scale, rotation (few degrees) and shift of the patient.
    C['scale'] = 1.0 + rng.normal(0, 0.055)
    C['theta'] = math.radians(rng.normal(0, 1.8))
    C['shift'] = (rng.normal(0, 0.03), rng.normal(0, 0.02))

    mid = 0.5 + rng.normal(0, 0.006)
    C['mid'] = mid
    # AP films are usually supine/semi-erect with poorer inspiration: higher domes.
    common = {
        'va': 0.135 + rng.normal(0, 0.01),
        'W': 0.335 + rng.normal(0, 0.018),
        'vcp': 0.775 + rng.normal(0, 0.02) - (0.03 if ap else 0.0),
    }
    lungs = [_Lung(rng, -1, mid, common), _Lung(rng, +1, mid, common)]
    C['lungs'] = lungs
    thorax = lungs[0].W + lungs[1].W  # inner thoracic width at its widest

    # Heart. True cardiothoracic ratio decides the label; AP magnifies it ~8 %,
    # a realistic confounder (AP films over-call cardiomegaly).
    cardio = bool(labels[0])
    if cardio:
        ctr = 0.50 + 0.10 * rng.beta(1.2, 3.0)  # mostly mild: 0.50 - 0.55
    else:
        ctr = float(np.clip(rng.normal(0.455, 0.028), 0.38, 0.53))
    C['ctr'] = ctr
    mag = 1.08 if ap else 1.0
    b_top = lungs[1].vtrunk + 0.05 + rng.normal(0, 0.01)
    b_bot = lungs[1].vcp + 0.01 + rng.normal(0, 0.008)
    # Big hearts also grow upwards a little and become more globular (tL earlier).
    b_top -= 0.5 * max(ctr - 0.47, 0.0)
    heart = _Heart(mid, b_top, b_bot, tR=0.55 + rng.normal(0, 0.04),
                   tL=0.78 + rng.normal(0, 0.03) - 0.6 * max(ctr - 0.47, 0.0),
                   fr=0.34 + rng.normal(0, 0.045))  # how far it sits right of midline
    heart.set_width(ctr * thorax * mag)
    for L in lungs:
        L.heart = heart
    C['heart'] = heart

    # Bones.
    C['rib'] = {
        'v1': common['va'] - 0.025 + rng.normal(0, 0.006),
        'sp': 0.057 + rng.normal(0, 0.003) - (0.004 if ap else 0.0),
        'k': (1.5 if ap else 2.1) + rng.normal(0, 0.15),
        'qpk': 0.09 + rng.normal(0, 0.01),
        'h': 0.0115 + rng.normal(0, 0.001),
        'jit': rng.normal(0, 0.004, size=(2, 12)),
        'amp': 0.18 + rng.normal(0, 0.02),
    }
    # AP: clavicles project higher and more horizontal (beam angulation).
    C['clav'] = {
        'v0': (0.155 if ap else 0.205) + rng.normal(0, 0.012),
        'slope': (-0.05 if ap else -0.17) + rng.normal(0, 0.03),
        'len': 0.30 + rng.normal(0, 0.015),
        'amp': 0.24 + rng.normal(0, 0.03),
    }
    C['spine_phase'] = rng.random()
    C['carina'] = 0.36 + rng.normal(0, 0.015)
    C['gastric'] = rng.random() < 0.6
    C['gastric_r'] = (0.045 + rng.normal(0, 0.008), 0.022 + rng.normal(0, 0.004))
    # Lung markings: polar ridge patterns around each hilum.
    C['mark'] = {
        'n': rng.uniform(10, 22, size=(2, 3)),
        'bend': rng.normal(0, 3.0, size=(2, 3)),
        'ph': rng.uniform(0, 2 * np.pi, size=(2, 3)),
        'amp': 0.10 + rng.normal(0, 0.015),
        'grid': rng.normal(0, 1, size=(10, 10)),
    }

    # Exposure / display.
    C['lo'] = 0.03 + rng.normal(0, 0.03)
    C['hi'] = 1.55 + rng.normal(0, 0.07)
    C['gamma'] = math.exp(rng.normal(0, 0.12))
    C['bg_grid'] = rng.normal(0, 1, size=(4, 4))
    C['bg_amp'] = rng.uniform(0.01, 0.04)
    C['heel'] = rng.normal(0, 0.025)
    C['noise'] = rng.uniform(0.012, 0.03)

    # ---------------- findings (each only if its label is positive) --------
    C['effusion'] = _sample_effusion(rng, lungs) if labels[1] else []
    C['nodule'] = [_sample_nodule(rng, lungs)] if labels[2] else []
    C['ptx'] = [_sample_ptx(rng)] if labels[3] else []
    C['consolidation'] = [_sample_consolidation(rng, lungs)] if labels[4] else []
    C['foreign'] = _sample_foreign(rng, mid, lungs) if labels[5] else []
    return C


def _sample_effusion(rng, lungs):
    u = rng.random()
    sides = [0] if u < 0.4 else [1] if u < 0.75 else [0, 1]
    return [{
        'lung': i,
        'H': 0.03 + 0.07 * rng.beta(1.5, 2.5),  # meniscus height at the chest wall
        'p': 1.6 + rng.random(),
        'amp': 0.34 + rng.normal(0, 0.05),
    } for i in sides]


def _sample_in_lung(rng, lungs, *, clearance, threshold, b_skip=0.0, n=64):
    """Position whose disc of radius ``clearance`` lies in a lung by ``threshold``.

    Draws ``n`` candidates at once (a fixed number of draws, so determinism does
    not depend on how many are rejected) and returns the first valid one.
    """
    side = rng.integers(2, size=n)
    u = rng.random((2, n))
    t = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    ring = np.concatenate([[0.0, 0.0], clearance * np.cos(t), clearance * np.sin(t)]).reshape(2, 13)
    ok = np.zeros(n, dtype=bool)
    A, B = np.empty(n), np.empty(n)
    for i, L in enumerate(lungs):
        sel = side == i
        q = L.qm + u[0, sel] * (L.W - L.qm)
        b = L.va + b_skip + u[1, sel] * (L.vcp - L.va - b_skip)
        a = L.mid + L.side * q
        m = L.margin(a[:, None] + ring[0], b[:, None] + ring[1]).min(axis=1)
        ok[sel], A[sel], B[sel] = m > threshold, a, b
    if ok.any():
        j = int(np.argmax(ok))
        return int(side[j]), float(A[j]), float(B[j])
    L = lungs[0]  # practically unreachable: a safe right mid-zone spot
    return 0, L.mid - 0.5 * (L.qm + L.W), 0.5 * (L.va + L.vcp) - 0.05


def _sample_nodule(rng, lungs):
    mass = rng.random() < 0.2
    r = rng.uniform(0.025, 0.04) if mass else rng.uniform(0.01, 0.02)  # radius
    amp = rng.uniform(0.14, 0.22) if mass else rng.uniform(0.12, 0.20)  # rib peak ~0.18
    # 1.6 r clearance: the whole (square) box of the nodule stays inside the lung.
    _, a, b = _sample_in_lung(rng, lungs, clearance=1.6 * r, threshold=0.006)
    return {'a': a, 'b': b, 'r': r, 'amp': amp, 'mass': mass}


def _sample_ptx(rng):
    return {
        'lung': int(rng.integers(2)),
        'd0': rng.uniform(0.02, 0.055),  # rim width at apex / upper lateral wall
        'extent': rng.uniform(0.35, 0.75),  # fraction of lung height it descends
        'line': rng.uniform(0.06, 0.10),
    }


def _sample_consolidation(rng, lungs):
    i, a, b = _sample_in_lung(rng, lungs, clearance=0.0, threshold=0.03, b_skip=0.1)
    return {
        'lung': i, 'a': a, 'b': b,
        'rx': rng.uniform(0.04, 0.085), 'ry': rng.uniform(0.04, 0.09),
        'amp': rng.uniform(0.2, 0.32),
        'grid': rng.normal(0, 1, size=(14, 14)),
    }


def _sample_foreign(rng, mid, lungs):
    n = 1 + int(rng.random() < 0.3)
    objs = []
    for _ in range(n):
        u = rng.random()  # wire 35 %, tube 25 %, coin 20 %, button 20 %
        kind = 'wire' if u < 0.35 else 'tube' if u < 0.6 else 'coin' if u < 0.8 else 'button'
        if kind in ('coin', 'button'):
            objs.append({
                'kind': kind,
                'a': rng.uniform(0.2, 0.8), 'b': rng.uniform(0.15, 0.85),
                'r': rng.uniform(0.012, 0.026) if kind == 'coin' else rng.uniform(0.01, 0.016),
                'amp': rng.uniform(0.6, 1.0) if kind == 'coin' else rng.uniform(0.25, 0.4),
            })
        elif kind == 'wire':
            # ECG lead: parabola in a random frame, electrode snap at one end.
            L = lungs[int(rng.integers(2))]
            objs.append({
                'kind': kind,
                'a': L.mid + L.side * rng.uniform(0.05, 0.3), 'b': rng.uniform(0.25, 0.75),
                'ang': rng.uniform(0, 2 * np.pi), 'kappa': rng.normal(0, 2.0),
                'len': rng.uniform(0.2, 0.45),
                'w': rng.uniform(0.0018, 0.003), 'amp': rng.uniform(0.35, 0.6),
            })
        else:
            # NG / ET tube down the oesophagus: near-vertical with gentle sway.
            objs.append({
                'kind': kind,
                'a': mid + rng.normal(0.01, 0.01), 'end': rng.uniform(0.3, 0.9),
                'sway': rng.normal(0, 0.015), 'freq': rng.uniform(1.0, 3.0),
                'w': rng.uniform(0.003, 0.0045), 'amp': rng.uniform(0.2, 0.3),
            })
    return objs


# --------------------------------------------------------------------------- #
# Geometry shared by the renderer and the (size-independent) box computation.
# --------------------------------------------------------------------------- #
def _to_image(C, a, b):
    """Anatomical -> normalised image coordinates."""
    s, th = C['scale'], C['theta']
    c, sn = math.cos(th), math.sin(th)
    x, y = np.asarray(a) - 0.5, np.asarray(b) - 0.5
    return (0.5 + C['shift'][0] + s * (c * x - sn * y),
            0.5 + C['shift'][1] + s * (sn * x + c * y))


def _anat_grid(C, size):
    """Normalised image grid -> anatomical coordinates (float32, [size, size])."""
    s, th = C['scale'], C['theta']
    c, sn = math.cos(th), math.sin(th)
    u = ((np.arange(size, dtype=_F32) + 0.5) / size - (0.5 + C['shift'][0])) / s
    v = ((np.arange(size, dtype=_F32) + 0.5) / size - (0.5 + C['shift'][1])) / s
    a = 0.5 + c * u[None, :] + sn * v[:, None]
    b = 0.5 - sn * u[None, :] + c * v[:, None]
    return a.astype(_F32), b.astype(_F32)


def _effusion_geom(L, e, a, b):
    """(top, h): meniscus level and fluid-layer height above the dome at (a, b)."""
    q = L.q(a)
    w = _c01((q - L.qm) * (1.0 / (L.W - L.qm)))
    vb, _ = L.base(q)
    h = e['H'] * w ** e['p']  # meniscus: climbs the lateral wall, thin medially
    top = vb - h
    return top, h


def _ptx_rim(L, p, b):
    """Rim width d(b): full over the upper 40 % of the pneumothorax, then tapering off."""
    L_v = p['extent'] * (L.vcp - L.va)
    return p['d0'] * (1.0 - _sstep((b - L.va - 0.4 * L_v) * (1.0 / (0.6 * L_v))))


def _ptx_collapsed_margin(L, p, a, b):
    """Signed distance to the collapsed lung's apical/lateral border, and d(b)."""
    d = _ptx_rim(L, p, b)
    m = L.margins(a, b, shrink_lat=d, shrink_apex=p['d0'])
    return np.minimum(m[0], m[2]), d


def _grid_points(a0, b0, a1, b1, na, nb):
    """Fixed (size-independent) sample grid used to measure analytic footprints."""
    return np.meshgrid(np.linspace(a0, a1, na), np.linspace(b0, b1, nb))


def _bbox_from_points(C, a, b, pad=0.0):
    """Normalised image-space bbox of anatomical points (None if empty)."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    if a.size == 0:
        return None
    u, v = _to_image(C, a, b)
    pad = pad * C['scale']
    box = [u.min() - pad, v.min() - pad, u.max() + pad, v.max() + pad]
    box = [min(max(x, 0.0), 1.0) for x in box]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def _finding_boxes(C) -> list[tuple[int, list[float]]]:
    """Normalised boxes of every finding except cardiomegaly (taken from the raster)."""
    out = []
    lungs = C['lungs']
    for e in C['effusion']:
        L = lungs[e['lung']]
        a0, _, a1, b1 = L.bounds()
        A, B = _grid_points(a0, L.vcp - L.Hd - e['H'] - 0.02, a1, b1, 80, 40)
        top, h = _effusion_geom(L, e, A, B)
        inside = (L.margin(A, B) > 0) & (B > top) & (h > 0.1 * e['H'])
        out.append((1, _bbox_from_points(C, A[inside], B[inside])))
    for n in C['nodule']:
        out.append((2, _bbox_from_points(C, n['a'], n['b'], pad=n['r'])))
    for p in C['ptx']:
        L = lungs[p['lung']]
        a0, b0, a1, _ = L.bounds()
        A, B = _grid_points(a0, b0, a1, L.va + p['extent'] * (L.vcp - L.va) + 0.01, 80, 64)
        mc, d = _ptx_collapsed_margin(L, p, A, B)
        inside = (L.margin(A, B) > 0) & (mc < 0) & (d > 0.1 * p['d0'])
        out.append((3, _bbox_from_points(C, A[inside], B[inside], pad=0.006)))  # + pleural line
    for c in C['consolidation']:
        L = lungs[c['lung']]
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        rad = np.linspace(0.0, 1.0, 8)[:, None]
        A = c['a'] + c['rx'] * rad * np.cos(t)
        B = c['b'] + c['ry'] * rad * np.sin(t)
        inside = L.margin(A, B) > 0
        out.append((4, _bbox_from_points(C, A[inside], B[inside])))
    for f in C['foreign']:
        pa, pb, pad = _foreign_outline(f)
        out.append((5, _bbox_from_points(C, pa, pb, pad=pad)))
    return [(k, bx) for k, bx in out if bx is not None]


def _wire_frame(f):
    c, s = math.cos(f['ang']), math.sin(f['ang'])
    return c, s


def _foreign_outline(f):
    """Sample points along a foreign object (anatomical coords) + padding."""
    if f['kind'] in ('coin', 'button'):
        return np.array([f['a']]), np.array([f['b']]), f['r']
    if f['kind'] == 'wire':
        c, s = _wire_frame(f)
        p = np.linspace(0.0, f['len'], 64)
        qq = f['kappa'] * p * p
        a = f['a'] + c * p - s * qq
        b = f['b'] + s * p + c * qq
        return a, b, max(0.011, 2 * f['w'])  # electrode snap radius at p = 0
    b = np.linspace(-0.1, f['end'], 64)
    a = f['a'] + f['sway'] * np.sin(f['freq'] * np.pi * b)
    return a, b, 2 * f['w']


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #
def _window(C, size, a0, b0, a1, b1):
    """Pixel slices covering the anatomical rectangle [a0, a1] x [b0, b1] (+2 px).

    Local structures are evaluated only inside their window: it keeps the cost
    per image roughly proportional to the area that actually changes.
    (Scalar math on purpose: this runs ~15 times per image.)
    """
    s, th = C['scale'], C['theta']
    c, sn = s * math.cos(th), s * math.sin(th)
    us, vs = [], []
    for x, y in ((a0, b0), (a1, b0), (a0, b1), (a1, b1)):
        us.append(c * (x - 0.5) - sn * (y - 0.5))
        vs.append(sn * (x - 0.5) + c * (y - 0.5))
    ox, oy = 0.5 + C['shift'][0], 0.5 + C['shift'][1]
    x0 = max(int(math.floor((ox + min(us)) * size)) - 2, 0)
    x1 = min(int(math.ceil((ox + max(us)) * size)) + 2, size)
    y0 = max(int(math.floor((oy + min(vs)) * size)) - 2, 0)
    y1 = min(int(math.ceil((oy + max(vs)) * size)) + 2, size)
    if x1 <= x0 or y1 <= y0:
        return None
    return np.s_[y0:y1, x0:x1]


def _render_case(C: dict, size: int, noise_rng: np.random.Generator):
    px = 1.0 / size  # one pixel in normalised units (anatomical ~ image, scale ~1)
    a, b = _anat_grid(C, size)
    mid = C['mid']
    lungs, heart = C['lungs'], C['heart']
    win = functools.partial(_window, C, size)

    # Body: neck widening into shoulders; thickness of an elliptic cylinder.
    dq = np.abs(a - mid)
    sh = _c01(b * (1.0 / 0.24))
    wb = 0.11 + 0.39 * np.sqrt(sh * (2.0 - sh)) - 0.035 * _sstep((b - 0.35) * (1.0 / 0.6))
    zb = dq / wb
    body_thk = np.sqrt(np.maximum(1.0 - zb * zb, 0.0))
    # The trunk is deeper (sternum-to-spine) centrally than at the lateral walls.
    D = 0.35 * _ramp((1.0 - zb) * wb, px) + body_thk * (
        0.5 + 0.25 * np.exp(-np.square(dq * (1.0 / 0.22))))

    # Heart: a little denser than the mediastinum, fading into it at the top.
    heart_mask = np.zeros((size, size), dtype=bool)
    sl = win(mid - heart.RA - 0.01, heart.b_top - 0.01, mid + heart.LV + 0.01, heart.b_bot + 0.01)
    if sl is not None:
        aa, bb = a[sl], b[sl]
        heart_mask[sl], thk = heart.render(aa, bb)
        D[sl] += 0.08 * thk

    # Lungs: air lowers the density; thicker (darker) away from the edges.
    lung_soft = [np.zeros((size, size), dtype=_F32) for _ in lungs]
    lung_win = []
    for i, L in enumerate(lungs):
        sl = win(*L.bounds())
        lung_win.append(sl)
        if sl is None:
            continue
        aa, bb = a[sl], b[sl]
        m_apex, m_med, m_lat, m_base = L.margins(aa, bb)
        outer = np.minimum(np.minimum(m_apex, m_lat), m_base)
        soft = _ramp(np.minimum(outer, m_med), px)
        lung_soft[i][sl] = soft
        # Lung gets thin towards the chest wall and domes, but meets the
        # mediastinum/heart with a sharp silhouette.
        D[sl] -= 0.74 * soft * np.sqrt(_c01(outer * (1.0 / 0.05))) * _c01(m_med * (1.0 / 0.012))
    lung_any = np.maximum(lung_soft[0], lung_soft[1])

    # Mediastinum details: trachea + main bronchi (air), spine with vertebrae.
    car = C['carina']
    sl = win(mid - 0.07, -0.2, mid + 0.07, car + 0.07)
    if sl is not None:
        aa, bb = a[sl], b[sl]
        # Soft (2-3 px at 224) edges: the tracheal wall is not a crisp tube.
        trach = _c01((0.016 - np.abs(aa - mid - 0.004)) * (1.0 / 0.006)) * _ramp(car - bb, px)
        for sd in (-1.0, 1.0):
            # bronchus: segment from the carina going down-laterally
            t = _c01(((aa - mid) * sd * 0.6 + (bb - car) * 0.8) * (1.0 / 0.06))
            ex = aa - (mid + sd * 0.6 * 0.06 * t)
            ey = bb - (car + 0.8 * 0.06 * t)
            trach = np.maximum(trach, _c01((0.012 - np.sqrt(ex * ex + ey * ey)) * (1.0 / 0.006)))
        D[sl] -= 0.16 * trach
    sl = win(mid - 0.035, -0.2, mid + 0.035, 1.2)
    if sl is not None:
        aa, bb = a[sl], b[sl]
        spine_thk = np.sqrt(np.maximum(1.0 - np.square((aa - mid) * (1.0 / 0.032)), 0.0))
        vert = 0.85 + 0.15 * np.cos((bb * (1.0 / 0.05) + C['spine_phase']) * (2 * np.pi))
        D[sl] += 0.07 * spine_thk * vert

    # Gastric bubble under the left hemidiaphragm: dome-shaped gas, flat fluid level.
    if C['gastric']:
        Ll = lungs[1]
        rx, ry = C['gastric_r']
        gcx = mid + 0.5 * (Ll.qm + Ll.W)
        top = Ll.vcp - Ll.Hd * 0.7 + 0.012
        sl = win(gcx - rx, top, gcx + rx, top + ry)
        if sl is not None:
            aa, bb = a[sl], b[sl]
            gx = (aa - gcx) * (1.0 / rx)
            gy = (bb - (top + ry)) * (1.0 / ry)
            D[sl] -= 0.13 * _ramp((1.0 - np.sqrt(gx * gx + gy * gy)) * ry, px) * _ramp(top + ry - bb, px)

    # Lung markings: polar ridges radiating from each hilum, tapering outwards.
    mk = C['mark']
    field = _smooth_field(mk['grid'], size)
    for i, L in enumerate(lungs):
        sl = lung_win[i]
        if sl is None:
            continue
        aa, bb, fl, soft = a[sl], b[sl], field[sl], lung_soft[i][sl]
        dx = (aa - (mid + L.side * (L.qm + 0.05))) * L.side
        dy = bb - 0.43
        r = np.sqrt(dx * dx + dy * dy) + 1e-3
        th = np.arctan2(dy, dx)
        th_r = th * (1.0 + r * 4.0)
        wig = 2.5 * fl  # smooth wiggle keeps the vessels from being perfect rays
        ridges = 0.0
        for j in range(3):
            c = np.maximum(np.cos(mk['n'][i, j] * th_r + mk['bend'][i, j] * r + (wig + mk['ph'][i, j])), 0.0)
            c = c * c
            c = c * c
            ridges = ridges + c * c
        tex = 0.6 + 0.4 * np.tanh(fl)
        # vessels taper: the outer third of the lung shows few markings
        fall = 0.15 + np.exp(-r * (1.0 / 0.14)) * _sstep(r * (1.0 / 0.05))
        hilum = np.exp(-np.square(r * (1.0 / 0.035)))
        markings = (ridges * fall * tex * _sstep(r * (1.0 / 0.07)) + 1.4 * hilum) * soft
        if C['ptx'] and C['ptx'][0]['lung'] == i:
            p = C['ptx'][0]
            mc, d = _ptx_collapsed_margin(L, p, aa, bb)
            # Effects fade out where the rim closes (d < 0.1 d0: the box's lower end).
            gone = (1.0 - _ramp(mc, px)) * _c01((d * (1.0 / p['d0']) - 0.1) * 4.0)
            markings *= 1.0 - gone  # no lung markings peripheral to the pleural line
            D[sl] -= 0.09 * soft * gone  # and the pleural space is more lucent
            D[sl] += p['line'] * _line(mc, 0.0025, px) * soft * _c01((d * (1.0 / p['d0']) - 0.1) * 4.0)
        D[sl] += mk['amp'] * markings

    # Ribs: posterior (curved arcs, convex upwards) and faint anterior ribs.
    rb = C['rib']
    for i, L in enumerate(lungs):
        lo_q, hi_q = 0.0, L.W + 0.05
        a0, a1 = sorted((mid + L.side * lo_q, mid + L.side * hi_q))
        sl = win(a0, rb['v1'] - 0.12, a1, 1.2)  # anterior ribs start higher laterally
        if sl is None:
            continue
        aa, bb = a[sl], b[sl]
        q = L.q(aa)
        phase = (bb - rb['k'] * np.square(q - rb['qpk']) - rb['v1']) * (1.0 / rb['sp'])
        k = np.minimum(np.maximum(np.rint(phase), 0.0), 11.0)
        d = (phase - k) * rb['sp'] + rb['jit'][i].astype(_F32)[k.astype(np.intp)]
        core = np.maximum(1.0 - np.square(d * (1.0 / rb['h'])), 0.0)
        prof = np.sqrt(core) * (0.75 + 0.25 * core)  # brighter cortical rim at the edges
        lat = _sstep((q - 0.02) * 50.0) * (1.0 - _sstep((q - L.W - 0.005) * 25.0))
        ribs = prof * lat * ((phase > -0.5) & (phase < 11.5))
        # Anterior ribs slope downwards towards the midline and fade medially.
        ph2 = (bb + 0.55 * q - rb['v1'] - 0.09) * (1.0 / (rb['sp'] * 1.25))
        d2 = (ph2 - np.rint(ph2)) * (rb['sp'] * 1.25 / 0.013)
        ant = np.maximum(1.0 - d2 * d2, 0.0) * ((ph2 > 0.5) & (ph2 < 6.5))
        ribs += 0.35 * ant * _sstep((q - 0.12) * 12.0) * (1.0 - _sstep((q - L.W) * 25.0))
        # Ribs are crisper against aerated lung than through soft tissue.
        D[sl] += rb['amp'] * ribs * (0.35 + 0.65 * lung_any[sl])

    # Clavicles: S-shaped bars from the sternal notch towards the shoulders.
    cl = C['clav']
    for L in lungs:
        v_lat = cl['v0'] + cl['slope'] * cl['len']
        a0, a1 = sorted((mid + L.side * 0.0, mid + L.side * (cl['len'] + 0.04)))
        sl = win(a0, min(cl['v0'], v_lat) - 0.04, a1, max(cl['v0'], v_lat) + 0.04)
        if sl is None:
            continue
        aa, bb = a[sl], b[sl]
        q = L.q(aa)
        vc = cl['v0'] + cl['slope'] * q + 0.012 * np.sin(q * (2 * np.pi / cl['len']))
        h = 0.017 - 0.006 * _c01(q * (1.0 / cl['len']))
        core = np.maximum(1.0 - np.square((bb - vc) / h), 0.0)
        ends = _sstep((q - 0.02) * 40.0) * (1.0 - _sstep((q - cl['len']) * 30.0))
        D[sl] += cl['amp'] * np.sqrt(core) * ends

    # ---------------- findings ----------------
    for e in C['effusion']:
        L = lungs[e['lung']]
        a0, _, a1, b1 = L.bounds()
        sl = win(a0, L.vcp - L.Hd - e['H'] - 0.03, a1, b1)
        if sl is None:
            continue
        aa, bb = a[sl], b[sl]
        top, h = _effusion_geom(L, e, aa, bb)
        below = _c01((bb - top) * (1.0 / 0.012))  # fuzzy meniscus edge
        deeper = 0.5 + 0.5 * _c01((bb - top) / (h + 1e-4))  # thicker fluid layer lower down
        # Fluid fades out medially where the layer gets thin (h < 0.1 H: box edge).
        thick = _c01((h * (1.0 / e['H']) - 0.1) * 5.0)
        D[sl] += e['amp'] * below * deeper * thick * lung_soft[e['lung']][sl]
    for n in C['nodule']:
        r = n['r']
        sl = win(n['a'] - r, n['b'] - r, n['a'] + r, n['b'] + r)
        if sl is None:
            continue
        dx, dy = a[sl] - n['a'], b[sl] - n['b']
        z = np.maximum(1.0 - (dx * dx + dy * dy) * (1.0 / (r * r)), 0.0)
        # sphere projection; masses get a softer (less well-defined) edge
        D[sl] += n['amp'] * (z ** 0.75 if n['mass'] else np.sqrt(z))
    for c in C['consolidation']:
        sl = win(c['a'] - c['rx'], c['b'] - c['ry'], c['a'] + c['rx'], c['b'] + c['ry'])
        if sl is None:
            continue
        dx, dy = (a[sl] - c['a']) * (1.0 / c['rx']), (b[sl] - c['b']) * (1.0 / c['ry'])
        ell = _sstep(1.0 - (dx * dx + dy * dy))  # fuzzy, ill-defined margins
        # Patchy (air-space filling is uneven) but never absent inside the box.
        patch = 0.55 + 0.45 * np.tanh(1.5 * _smooth_field(c['grid'], size)[sl])
        D[sl] += c['amp'] * ell * patch * lung_soft[c['lung']][sl]
    for f in C['foreign']:
        pa, pb, pad = _foreign_outline(f)
        pad += 3 * max(f.get('w', 0.0), px)
        sl = win(pa.min() - pad, pb.min() - pad, pa.max() + pad, pb.max() + pad)
        if sl is not None:
            D[sl] += _draw_foreign(f, a[sl], b[sl], px)

    # ---------------- film: exposure, gamma, shading, quantum noise ---------
    # tanh = film shoulder: dense regions compress, so ribs over soft tissue or
    # the abdomen lose contrast as on a real film.
    x = _c01((D - C['lo']) * (1.0 / (C['hi'] - C['lo']))) ** C['gamma']
    I = np.tanh(x * 1.2) * (1.0 / math.tanh(1.2))
    I += C['bg_amp'] * _smooth_field(C['bg_grid'], size) + C['heel'] * (b - 0.5)
    # Quantum noise is larger where fewer photons arrive (dense = bright) and,
    # per pixel, grows with resolution (smaller pixels collect fewer photons).
    sigma = C['noise'] * math.sqrt(size / 224.0)
    I += (sigma * 0.5 + (sigma * 0.8) * _c01(I)) * noise_rng.standard_normal((size, size), dtype=_F32)
    image = (_c01(I) * 255.0 + 0.5).astype(np.uint8)

    lung_mask = lung_any >= 0.5
    seg = np.where(heart_mask, np.uint8(2), lung_mask.astype(np.uint8))
    return image, seg, heart_mask


def _draw_foreign(f, a, b, px):
    if f['kind'] in ('coin', 'button'):
        dx, dy = a - f['a'], b - f['b']
        d = np.sqrt(dx * dx + dy * dy)
        disc = _ramp(f['r'] - d, px)
        if f['kind'] == 'button':
            o = 0.33 * f['r']
            hr = max(0.22 * f['r'], 0.5 * px)
            holes = np.zeros_like(a)
            for sx in (-1, 1):
                for sy in (-1, 1):
                    ex, ey = dx - sx * o, dy - sy * o
                    holes = np.maximum(holes, _ramp(hr - np.sqrt(ex * ex + ey * ey), px))
            disc = disc * (1.0 - 0.8 * holes) + 0.4 * _line(d - 0.85 * f['r'], 0.1 * f['r'], px)
        return f['amp'] * disc
    if f['kind'] == 'wire':
        c, s = _wire_frame(f)
        dx, dy = a - f['a'], b - f['b']
        p = dx * c + dy * s
        q = -dx * s + dy * c
        pc = np.minimum(np.maximum(p, 0.0), f['len'])
        dist = np.abs(q - f['kappa'] * pc * pc) / np.sqrt(1.0 + np.square(2 * f['kappa'] * pc))
        dist = np.sqrt(dist * dist + np.square(p - pc))
        snap = _ramp(0.009 - np.sqrt(dx * dx + dy * dy), px)
        return f['amp'] * np.maximum(_line(dist, f['w'], px), 0.9 * snap)
    # tube: faint walls + a radiopaque stripe, ending with a soft tip
    x = f['a'] + f['sway'] * np.sin(f['freq'] * np.pi * b)
    d = np.abs(a - x)
    along = _ramp(f['end'] - b, px)
    walls = _line(d - 2.0 * f['w'], 0.6 * f['w'], px)
    stripe = _line(d, 0.5 * f['w'], px)
    return f['amp'] * (0.5 * walls + stripe) * along


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def render(index: int, *, seed: int = 0, size: int = 224) -> dict:
    """Render phantom ``index`` of stream ``seed`` at ``size`` x ``size`` pixels.

    Returns a dict:
      'image':  np.uint8 [size, size] grayscale radiograph (bright = dense)
      'labels': np.float32 [len(FINDINGS)] 0/1
      'seg':    np.uint8 [size, size] 0=background, 1=lung, 2=heart (heart wins)
      'boxes':  np.float32 [MAX_BOXES, 5] rows (class_index, x0, y0, x1, y1) in
                pixels of this image, padded with -1 rows; one per finding instance
      'view':   'PA' or 'AP'
      'id':     f'phantom-s{seed}-{index:08d}'
    """
    index = _check_index(index, 'index')
    seed = _check_index(seed, 'seed')
    size = _check_size(size)
    C = _sample_case(index, seed)
    image, seg, heart_mask = _render_case(C, size, np.random.default_rng([seed, index, 1]))

    boxes = np.full((MAX_BOXES, 5), -1.0, dtype=np.float32)
    rows = []
    if C['labels'][0]:
        # The heart box is exactly the bounding box of the drawn heart mask.
        ys = np.flatnonzero(heart_mask.any(axis=1))
        xs = np.flatnonzero(heart_mask.any(axis=0))
        rows.append((0, [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]))
    rows += [(k, [x * size for x in bx]) for k, bx in _finding_boxes(C)]
    rows.sort(key=lambda r: r[0])
    for i, (k, bx) in enumerate(rows[:MAX_BOXES]):
        boxes[i] = (k, *bx)
    return {
        'image': image,
        'labels': C['labels'].copy(),
        'seg': seg,
        'boxes': boxes,
        'view': C['view'],
        'id': f'phantom-s{seed}-{index:08d}',
    }


def case_labels(index: int, seed: int = 0) -> np.ndarray:
    """Labels of phantom ``index`` of stream ``seed`` without rendering it.

    Equal to ``render(index, seed=seed)['labels']`` (float32 [len(FINDINGS)] 0/1) at
    ~50 us instead of milliseconds: labels are the first draws of the case's RNG, so
    label-only consumers (label-efficiency subsets, prevalence checks) never render.
    """
    index = _check_index(index, 'index')
    seed = _check_index(seed, 'seed')
    return _draw_labels(np.random.default_rng([seed, index])).astype(_F32)


class PhantomSource:
    """Random-access source for ``grain.MapDataset.source()``.

    ``split`` selects a disjoint index range of the same seed stream
    (train: [0, 1e9), val: [1e9, 2e9), test: [2e9, 3e9)), so examples and ids
    never overlap between splits. Picklable: it only stores four scalars.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, size: int = 224, split: str = 'train'):
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
                or not 0 < num_examples <= SPLIT_CAPACITY:
            raise ValueError(
                f'num_examples must be an integer in [1, {SPLIT_CAPACITY}], got {num_examples!r}')
        if split not in SPLIT_OFFSETS:
            raise ValueError(f'split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}')
        self.num_examples = int(num_examples)
        self.seed = _check_index(seed, 'seed')
        self.size = _check_size(size)
        self.split = split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        i = _check_index(i, 'index')
        if i >= self.num_examples:
            raise ValueError(f'index must be in [0, {self.num_examples}), got {i}')
        return render(SPLIT_OFFSETS[self.split] + i, seed=self.seed, size=self.size)

    def label_matrix(self) -> np.ndarray:
        """float32 [num_examples, len(FINDINGS)] labels of every example, without rendering."""
        offset = SPLIT_OFFSETS[self.split]
        out = np.empty((self.num_examples, len(FINDINGS)), _F32)
        for i in range(self.num_examples):
            out[i] = case_labels(offset + i, self.seed)
        return out

    def __repr__(self) -> str:
        return (f'PhantomSource(num_examples={self.num_examples}, seed={self.seed}, '
                f'size={self.size}, split={self.split!r})')


def save_example_grid(path: str, *, n: int = 16, size: int = 256, seed: int = 0,
                      contours: bool = True) -> None:
    """Save a grid of ``n`` examples titled with view + positive findings, boxes drawn."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
    colors = plt.get_cmap('tab10')
    for ax in axes.ravel():
        ax.axis('off')
    for i in range(n):
        ex = render(i, seed=seed, size=size)
        ax = axes.ravel()[i]
        ax.imshow(ex['image'], cmap='gray', vmin=0, vmax=255, interpolation='nearest')
        if contours:
            ax.contour(ex['seg'] == 1, levels=[0.5], colors=['#4fc3f7'], linewidths=0.5, alpha=0.6)
            ax.contour(ex['seg'] == 2, levels=[0.5], colors=['#ffb74d'], linewidths=0.5, alpha=0.6)
        for k, x0, y0, x1, y1 in ex['boxes']:
            if k < 0:
                continue
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor=colors(int(k)), linewidth=1.0))
        pos = [FINDINGS[j] for j in np.flatnonzero(ex['labels'])]
        title = f"{ex['id'][-4:]} {ex['view']}: " + (', '.join(pos) if pos else 'no finding')
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
