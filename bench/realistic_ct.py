"""Realistic synthetic coronary CTA cases, drawn independently of the kit's phantoms (`coronary_mlops.data.make_phantom`),
for benchmarks that should not share the kit's own assumptions.

Each case is a chest in HU: air around a body ellipse (subcutaneous fat, chest-wall muscle), both lungs with contrast-
filled pulmonary vessels (bright tubes that are *not* labelled), the liver dome, ribs with costal cartilage, the sternum,
vertebrae with discs, canal and posterior arch (bone 700-1200 HU), paraspinal muscles, the descending aorta, and the
heart: epicardial fat, pericardium, myocardium (~100 HU), LV/RV/LA/RA (contrast 300-450 HU, the right heart mixed and
mottled), the LV outflow, aortic root (sinuses) and ascending aorta, and the pulmonary trunk. Two coronary trees start
at ostia on the aortic root: left main -> LAD (with diagonals) and LCX (with obtuse marginals), and the RCA (acute
marginals, PDA, posterolateral branch). They run tortuously in the epicardial fat on the heart's surface, tapering from
4 mm to 1 mm, at the aorta's contrast with distal fall-off. Each case holds a stenosis (the lumen narrowed by 40-75 %,
soft plaque around it) and 2-4 calcified plaques (800-1200 HU, 1-3 mm, eccentric, pressing into the lumen), plus
calcium on the aortic root. The label is the coronary lumen (calcium and soft plaque are not labelled; the aorta is not).
The image is blurred (partial volume, anisotropic) and carries spatially correlated noise (SD 20-40 HU).

Scale: vessel calibres, plaques, blur and noise are in true millimetres; the macro anatomy (body, lungs, heart, aorta,
spine) is laid out in units of the field of view, so that the whole chest is seen at any shape. At a clinical field
of view (about 200 mm, e.g. 512x512 at 0.4 mm) that is life size; at the default 168x168x112 x 0.42x0.42x0.7 mm
(70x70x78 mm) it is a small chest (heart about 30 mm across, aorta about 10 mm) with life-size coronaries, whose lumen
is 0.2-0.8 % of the voxels as in ImageCAS-like crops.

Storage varies per case as scanners' files do: int16 HU (slope 1, intercept 0), int16 HU+1024 (intercept -1024), or
int16 with slope 0.5 (intercept -1000); RAS or LPS affines (negative x and y); the label (uint8) shares the image's
affine exactly. Folders are ImageCAS-style: `1.img.nii.gz` + `1.label.nii.gz`, ... (what `coronary_mlops.data.discover`
reads), plus `cases.json` describing each case.

Run: .venv/bin/python bench/realistic_ct.py OUT --cases 10 --seed 0 [--shape 168,168,112] [--spacing 0.42,0.42,0.7]
                                            [--preview preview.png] [--no-vary]
"""
from __future__ import annotations
import argparse, json, math, sys, time
from pathlib import Path
import numpy as np
from scipy import ndimage

__all__ = ['make_case', 'write_folder', 'preview', 'STORAGE']

STORAGE = {'hu': (1.0, 0.0), 'hu+1024': (1.0, -1024.0), 'half-hu+1000': (0.5, -1000.0)}  # name: (scl_slope, scl_inter)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float); return v / np.linalg.norm(v)


class _Grid:
    "World (RAS mm) coordinates of a voxel grid with a diagonal affine, as broadcastable 1-D arrays"
    def __init__(self, shape, affine):
        self.shape, self.affine, self.inv = tuple(shape), affine, np.linalg.inv(affine)
        self.sp = np.abs(np.diag(affine)[:3])
        d, t = np.diag(affine)[:3], affine[:3, 3]
        ax = [(t[k] + d[k] * np.arange(shape[k])).astype(np.float32) for k in range(3)]
        self.x, self.y, self.z = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]

    def index(self, pts) -> np.ndarray:
        "Continuous voxel indices of world points (N, 3)"
        return np.asarray(pts, float) @ self.inv[:3, :3].T + self.inv[:3, 3]

    def rho(self, c, frame, semi) -> np.ndarray:
        "Normalised ellipsoid radius (1 on the surface) of every voxel; `frame` columns are the ellipsoid's axes"
        dx, dy, dz = self.x - np.float32(c[0]), self.y - np.float32(c[1]), self.z - np.float32(c[2])
        s = 0
        for k in range(3):
            q = np.float32(frame[0, k]) * dx + np.float32(frame[1, k]) * dy + np.float32(frame[2, k]) * dz
            s = s + (q / np.float32(semi[k])) ** 2
        return np.sqrt(s)

    def seg_dist(self, p0, p1) -> np.ndarray:
        "Distance (mm) of every voxel to the segment p0-p1"
        p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        d = p1 - p0; L2 = float(d @ d)
        dx, dy, dz = self.x - p0[0], self.y - p0[1], self.z - p0[2]
        t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / np.float32(L2), 0, 1)
        return np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)


def _paint(g:_Grid, pts, rad, mask, hu=None, vals=None):
    "Union of balls (world centres `pts`, radii `rad` mm) into bool `mask`; their `vals` into float array `hu`"
    idx, sp, sh = g.index(pts), g.sp, g.shape
    vals = np.zeros(len(idx)) if vals is None else np.broadcast_to(np.asarray(vals, float), (len(idx),))
    for c, r, v in zip(idx, np.broadcast_to(rad, (len(idx),)), vals):
        h = np.ceil(r / sp).astype(int) + 1
        f = np.floor(c).astype(int)
        lo, hi = np.maximum(f - h, 0), np.minimum(f + h + 2, sh)
        if np.any(hi <= lo): continue
        a = ((np.arange(lo[0], hi[0]) - c[0]) * sp[0]) ** 2
        b = ((np.arange(lo[1], hi[1]) - c[1]) * sp[1]) ** 2
        e = ((np.arange(lo[2], hi[2]) - c[2]) * sp[2]) ** 2
        m = (a[:, None, None] + b[None, :, None] + e[None, None, :]) <= r * r
        sl = tuple(slice(l, u) for l, u in zip(lo, hi))
        mask[sl] |= m
        if hu is not None: hu[sl][m] = v


def _resample(pts, step=0.25):
    "Points along a polyline at equal arc steps (mm), and their arc-length fraction 0..1"
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0], np.cumsum(seg)]); L = s[-1]
    n = max(2, int(L / step) + 1); si = np.linspace(0, L, n)
    out = np.stack([np.interp(si, s, pts[:, k]) for k in range(3)], 1)
    return out, si / max(L, 1e-9), L


def _smooth_field(rng, shape, coarse=(7, 7, 5)) -> np.ndarray:
    "A smooth random field of SD about 1 at the grid's shape (low-frequency texture)"
    f = rng.normal(0, 1, coarse).astype(np.float32)
    return ndimage.zoom(f, [s / c for s, c in zip(shape, coarse)], order=3, mode='nearest')[:shape[0], :shape[1], :shape[2]]


class _Heart:
    "The ventricles' ellipsoid frame: surface points by (theta from base 0 to apex pi, phi from anterior toward left)"
    def __init__(self, c, frame, semi):
        self.c, self.R, self.a = np.asarray(c, float), frame, np.asarray(semi, float)

    def world(self, q): return self.c + np.asarray(q) @ self.R.T

    def surface(self, th, ph, off):
        "World points on the surface at (th, ph), pushed out along the normal by `off` mm"
        q = np.stack([-self.a[0] * np.cos(th), self.a[1] * np.sin(th) * np.cos(ph), self.a[2] * np.sin(th) * np.sin(ph)], 1)
        n = q / self.a ** 2; n /= np.linalg.norm(n, axis=1, keepdims=True)
        return self.world(q + n * np.asarray(off)[:, None])


def _wiggle(rng, t, L, amp_mm, period_mm):
    "Smooth tortuosity (mm) along a path of length L: a slow bend plus a faster meander"
    slow = sum(rng.uniform(0.5, 1.0) * amp_mm * np.sin(2 * np.pi * rng.uniform(0.4, 1.4) * t + rng.uniform(0, 2 * np.pi))
               for _ in range(2))
    cyc = max(L / period_mm, 1.0)
    fast = 0.5 * amp_mm * np.sin(2 * np.pi * cyc * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.5, 1.0)
    return slow / 2 + fast


def _taper(r0, r1, t):
    "Radius along a vessel: slow at first, faster distally (r0 at t=0, r1 at t=1)"
    return r0 - (r0 - r1) * np.asarray(t) ** 1.3


def _groove_path(rng, heart:_Heart, th0, th1, ph0, ph1, r0, r1, tort=1.0, n=400):
    "A vessel on the heart's surface from (th0, ph0) to (th1, ph1): (points, radii, t)"
    t = np.linspace(0, 1, n)
    am = float(np.mean(heart.a))
    th, ph = th0 + (th1 - th0) * t, ph0 + (ph1 - ph0) * t
    L0 = am * math.hypot(th1 - th0, (ph1 - ph0) * math.sin(max(th0, th1, 0.3)))
    th = th + _wiggle(rng, t, L0, 1.6 * tort, rng.uniform(7, 12)) / am
    ph = ph + _wiggle(rng, t, L0, 1.6 * tort, rng.uniform(7, 12)) / (am * np.maximum(np.sin(th), 0.3))
    rr = _taper(r0, r1, t)
    off = rr + 0.35 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6))
    pts, tt, L = _resample(heart.surface(th, ph, off), 0.2)
    return pts, _taper(r0, r1, tt), tt, (np.interp(tt, t, th), np.interp(tt, t, ph))


def _ostial(ostium, out_dir, target, r0, r1, n=60):
    "The proximal segment from an ostium on the aortic root to the heart's surface: a quadratic Bezier"
    L = np.linalg.norm(target - ostium)
    ctrl = ostium + out_dir * 0.5 * L
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * ostium + 2 * (1 - t) * t * ctrl + t ** 2 * target
    pts, tt, _ = _resample(pts, 0.2)
    return pts, r0 * (r1 / r0) ** tt


def make_case(seed:int, shape=(168, 168, 112), spacing=(0.42, 0.42, 0.7), orientation:str|None=None,
              return_info:bool=False):
    """One synthetic coronary CTA: (image int16 HU, label uint8 lumen, affine 4x4); with `return_info`, also a dict
    describing it. `orientation` 'RAS' or 'LPS' (negative x and y); None: drawn from the seed (LPS for about 40 %)"""
    rng = np.random.default_rng(seed)
    shape, sp = tuple(int(s) for s in shape), np.asarray(spacing, float)
    orientation = orientation or ('LPS' if rng.random() < 0.4 else 'RAS')
    sign = np.array([-1, -1, 1]) if orientation == 'LPS' else np.ones(3)
    half = sp * (np.array(shape) - 1) / 2
    centre = rng.uniform([-30, -220, -60], [30, -140, 60]) if rng.random() < 0.7 else np.zeros(3)  # scanner offset
    aff = np.eye(4); aff[:3, :3] = np.diag(sign * sp); aff[:3, 3] = centre - sign * half
    g = _Grid(shape, aff)
    O = centre.astype(float)
    u = float(min(half[0], half[1]))       # the layout's unit: half the in-plane field of view
    hz = float(half[2])
    j = lambda lo=0.9, hi=1.1: rng.uniform(lo, hi)

    # --- intensities of this case (HU) ---
    blood = rng.uniform(300, 450); right = blood * rng.uniform(0.65, 1.05)
    HU = dict(air=-1000, fat=rng.uniform(-115, -85), muscle=rng.uniform(35, 55), lung=rng.uniform(-870, -820),
              myo=rng.uniform(85, 120), liver=rng.uniform(60, 100), cortex=rng.uniform(1000, 1200),
              marrow=rng.uniform(700, 820), disc=rng.uniform(70, 100), csf=rng.uniform(5, 20),
              cartilage=rng.uniform(120, 200), blood=blood, right=right, coronary=blood * rng.uniform(0.92, 1.02),
              soft_plaque=rng.uniform(30, 70), pericardium=rng.uniform(20, 40))
    img = np.full(shape, HU['air'], np.float32)

    # --- body: fat, chest-wall muscle, thorax ---
    bc = O + np.array([0, -0.08 * u, 0]); B = np.array([0.95 * u * j(0.95, 1.02), 0.84 * u * j(0.95, 1.02)])
    rb = np.sqrt(((g.x - bc[0]) / B[0]) ** 2 + ((g.y - bc[1]) / B[1]) ** 2)  # (X, Y, 1)
    fat_t, mus_t = 0.05 * u * j(0.7, 1.4), 0.06 * u * j(0.8, 1.2)
    r_fat = 1 - fat_t / B.mean(); r_in = r_fat - mus_t / B.mean()
    body2 = rb < 1
    img[np.broadcast_to(body2, shape)] = HU['fat']
    img[np.broadcast_to(rb < r_fat, shape)] = HU['muscle']
    thorax2 = rb < r_in
    thorax = np.broadcast_to(thorax2, shape)
    img[thorax] = HU['fat'] * 0.8  # mediastinal fat

    # --- lungs (textured) with the liver dome below ---
    tex = _smooth_field(rng, shape)
    lung = np.zeros(shape, bool)
    for side in (1, -1):  # right (+x), left (-x)
        lc = O + np.array([side * (0.50 if side > 0 else 0.56) * u, -0.12 * u, 0.15 * hz])
        ls = np.array([(0.40 if side > 0 else 0.35) * u, 0.62 * u, 1.6 * hz]) * j(0.93, 1.07)
        lung |= g.rho(lc, np.eye(3), ls) < 1
    zd0 = O[2] - 0.55 * u * j(0.85, 1.2)
    dome = zd0 - 0.6 * u * (((g.x - O[0] - 0.3 * u) / (1.1 * u)) ** 2 + ((g.y - O[1]) / (1.0 * u)) ** 2)
    liver = thorax & (g.z < dome)
    lung &= thorax & ~liver
    img[lung] = HU['lung'] + 25 * tex[lung]
    img[liver] = HU['liver'] + 6 * tex[liver]

    # pulmonary vessels: contrast-filled tubes radiating from the hila (bright, tubular, not labelled)
    pv = np.zeros(shape, bool); pv_hu = np.zeros(shape, np.float32)
    for side in (1, -1):
        hil = O + np.array([side * 0.25 * u, -0.15 * u, 0.1 * hz])
        for _ in range(rng.integers(10, 16)):
            d = _unit([side * rng.uniform(0.4, 1), rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)])
            L = rng.uniform(0.45, 0.9) * u
            t = np.linspace(0, 1, 80)[:, None]
            bend = _unit(np.cross(d, rng.normal(size=3))) * rng.uniform(0.05, 0.2) * u
            pts = hil + t * L * d + np.sin(np.pi * t) * bend
            pts, tt, _ = _resample(pts, 0.3)
            r = rng.uniform(1.4, 2.4) * (0.35 / rng.uniform(1.4, 2.4)) ** tt
            _paint(g, pts, np.maximum(r, 0.3), pv, pv_hu, right * rng.uniform(0.55, 0.95) * (1 - 0.3 * tt))
    pv &= lung
    img[pv] = pv_hu[pv]

    # --- bones: ribs with costal cartilage, sternum, vertebrae; paraspinal muscles ---
    ang = np.arctan2((g.y - bc[1]) / B[1], (g.x - bc[0]) / B[0])      # (X, Y, 1)
    w = np.abs(np.angle(np.exp(1j * (ang + np.pi / 2))))               # 0 at the spine .. pi at the sternum
    period, slope = 0.24 * u * j(), 0.2 * j(0.7, 1.3)
    zr = g.z - O[2] - rng.uniform(0, period) + slope * w * B.mean()
    dz = (zr + period / 2) % period - period / 2
    dr = (rb - (r_in + 0.015)) * B.mean()
    rib_r, rib_h = 0.032 * u * j(), 0.05 * u * j()
    e = (dr / rib_r) ** 2 + (dz / rib_h) ** 2
    rib = (e < 1) & (w > 0.35) & body2
    cart = rib & (w > np.pi - 0.55)
    img[rib & ~cart & (e >= 0.35)] = HU['cortex']; img[rib & ~cart & (e < 0.35)] = HU['marrow']
    img[cart] = HU['cartilage']
    st_c = (bc[0], bc[1] + B[1] * (r_in + 0.02) - 0.04 * u)
    es = ((g.x - st_c[0]) / (0.085 * u)) ** 2 + ((g.y - st_c[1]) / (0.035 * u)) ** 2
    img[np.broadcast_to(es < 1, shape)] = HU['cortex']
    img[np.broadcast_to(es < 0.45, shape)] = HU['marrow']
    vb = (O[0] + rng.uniform(-0.03, 0.03) * u, bc[1] - 0.52 * u + 0.08 * u)  # vertebral body centre (x, y)
    rv = 0.11 * u * j()
    for sx in (1, -1):  # paraspinal muscles
        em = ((g.x - vb[0] - sx * 0.2 * u) / (0.13 * u)) ** 2 + ((g.y - vb[1] + 0.22 * u) / (0.12 * u)) ** 2
        img[np.broadcast_to((em < 1) & body2, shape)] = HU['muscle']
    dv = np.sqrt((g.x - vb[0]) ** 2 + (g.y - vb[1]) ** 2)
    pv_period = 0.25 * u * j(); zv = (g.z - O[2] - rng.uniform(0, pv_period)) % pv_period
    disc = zv < 0.05 * u
    img[np.broadcast_to(dv < rv, shape)] = HU['cortex']
    img[np.broadcast_to(dv < rv - 0.018 * u, shape)] = HU['marrow']
    img[(dv < rv) & disc] = HU['disc']
    cc = (vb[0], vb[1] - rv - 0.065 * u); dcan = np.sqrt((g.x - cc[0]) ** 2 + (g.y - cc[1]) ** 2)
    spinous = (np.abs(g.x - cc[0]) < 0.02 * u) & (g.y < cc[1]) & (g.y > cc[1] - 0.17 * u)
    arch = (dcan < 0.085 * u) & (zv > 0.08 * u) | spinous & (np.abs(zv - 0.6 * pv_period) < 0.3 * pv_period)
    img[arch & body2] = HU['cortex']
    img[np.broadcast_to(dcan < 0.058 * u, shape)] = HU['csf']

    # --- great vessels and heart ---
    ra = min(rng.uniform(12.5, 15.0), rng.uniform(0.13, 0.15) * u)   # aortic radius (mm)
    dao = np.array([vb[0] - 0.21 * u, vb[1] + 0.13 * u])
    d_desc = g.seg_dist(np.r_[dao + rng.uniform(-0.03, 0.03, 2) * u, O[2] - 2 * hz],
                        np.r_[dao + rng.uniform(-0.03, 0.03, 2) * u, O[2] + 2 * hz])
    img[d_desc < 0.8 * ra + 1.0] = HU['muscle']  # the aortic wall
    img[d_desc < 0.8 * ra] = blood

    e1 = _unit(np.array([-0.6, 0.5, -0.6]) + rng.uniform(-0.12, 0.12, 3))     # base -> apex: left, anterior, inferior
    e2 = _unit(np.array([0, 1.0, 0]) - e1[1] * e1)                            # toward anterior
    e3 = np.cross(e1, e2); e3 = e3 if e3[0] < 0 else -e3                        # toward the patient's left (-x)
    frame = np.stack([e1, e2, e3], 1)
    hc = O + np.array([-0.12 * u, 0.06 * u, -0.15 * hz]) + rng.uniform(-0.04, 0.04, 3) * u
    a = np.array([0.58, 0.42, 0.44]) * u * j(0.92, 1.08)
    H = _Heart(hc, frame, a)
    am = float(a.mean())
    epi = rng.uniform(2.5, 4.0)   # epicardial fat, mm
    rho_h = g.rho(hc, frame, a)
    peri = (rho_h < 1 + (epi + 0.8) / am) & ~(rho_h < 1 + epi / am)
    img[peri] = HU['pericardium']
    img[rho_h < 1 + epi / am] = HU['fat'] * rng.uniform(0.8, 1.0)
    # atria, behind and above the base
    atria = []
    for q, s, hu, mot in ((np.array([-1.05, -0.45, 0.25]), np.array([0.32, 0.36, 0.42]), blood, 6),   # LA
                          (np.array([-0.90, 0.10, -0.62]), np.array([0.38, 0.40, 0.34]), right, 35)):  # RA
        c = H.world(q * a); rr = g.rho(c, frame, s * a * j(0.9, 1.1))
        img[rr < 1.08] = HU['myo'] * 0.9; atria.append((rr < 1, hu, mot))
    img[rho_h < 1] = HU['myo'] + 8 * tex[rho_h < 1]
    lv = g.rho(H.world(np.array([0.12, -0.12, 0.22]) * a), frame, a * np.array([0.74, 0.50, 0.50]) * j(0.95, 1.05)) < 1
    rv_c = g.rho(H.world(np.array([-0.02, 0.25, -0.40]) * a), frame, a * np.array([0.70, 0.62, 0.45])) < 1
    sept = g.rho(H.world(np.array([0.12, -0.12, 0.22]) * a), frame, a * np.array([0.74, 0.50, 0.50]) + 0.06 * u) < 1
    rv_c &= ~sept & (rho_h < 1 - 1.2 / am)
    mottle = _smooth_field(rng, shape, (11, 11, 8))
    img[lv] = blood + 6 * mottle[lv]
    img[rv_c] = right + 35 * mottle[rv_c]
    for m, hu, mot in atria:
        img[m] = hu + mot * mottle[m]
    # aortic root (sinuses) with the LV outflow, the ascending aorta and the pulmonary trunk
    root = H.world(np.array([-1.0, 0.12, 0.05]) * a)
    d_root = np.sqrt((g.x - root[0]) ** 2 + (g.y - root[1]) ** 2 + (g.z - root[2]) ** 2)
    asc_dir = _unit([rng.uniform(0.05, 0.3), rng.uniform(0.0, 0.25), 1])
    d_asc = g.seg_dist(root, root + asc_dir * 3 * hz)
    lvot = g.seg_dist(H.world(np.array([-0.3, -0.05, 0.15]) * a), root)
    pa0 = H.world(np.array([-0.85, 0.65, -0.05]) * a)
    pa_dir = _unit([-rng.uniform(0.2, 0.5), -rng.uniform(0.2, 0.6), 1])
    d_pa = g.seg_dist(pa0, pa0 + pa_dir * 3 * hz)
    wall = 1.0
    for d, r in ((d_asc, ra + wall), (d_root, 1.2 * ra + wall), (d_pa, 0.85 * ra + wall)):
        img[d < r] = HU['muscle']
    aorta = (d_asc < ra) | (d_root < 1.2 * ra) | (lvot < 0.6 * ra)
    img[aorta] = blood + 5 * mottle[aorta]
    img[d_pa < 0.85 * ra] = right + 30 * mottle[d_pa < 0.85 * ra]

    # --- coronary trees ---
    lumen = np.zeros(shape, bool); cor_hu = np.zeros(shape, np.float32)
    vessels = []   # (name, points, radii, t)
    rs = 1.2 * ra  # sinus radius
    th_av = np.pi * rng.uniform(0.24, 0.32)
    # left: ostium on the left-posterior sinus, left main to the bifurcation on the base, LAD and LCX
    dl = _unit(np.array([-1, -0.25, 0.1]) + rng.uniform(-0.2, 0.2, 3))
    ost_l = root + dl * (rs - 0.5)
    ph_lad, ph_b = rng.uniform(0.2, 0.5), rng.uniform(0.75, 1.05)
    bif = H.surface(np.array([th_av]), np.array([ph_b]), np.array([2.4]))[0]
    r_lm = rng.uniform(1.8, 2.1)
    pts, r = _ostial(ost_l, dl, bif, r_lm, 0.95 * r_lm)
    vessels.append(('LM', pts, r))
    pts, r, t, (th, ph) = _groove_path(rng, H, th_av, np.pi * rng.uniform(1.0, 1.12), ph_b, ph_lad, 0.85 * r_lm, 0.5)
    vessels.append(('LAD', pts, r)); lad = (th, ph, r)
    pts, r, t, (th2, ph2) = _groove_path(rng, H, th_av + 0.05, th_av + rng.uniform(0.0, 0.15),
                                         ph_b + 0.1, ph_b + rng.uniform(1.6, 2.1), 0.78 * r_lm, 0.5)
    vessels.append(('LCX', pts, r)); lcx = (th2, ph2, r)
    if rng.random() < 0.35:  # ramus intermedius
        pts, r, _, _ = _groove_path(rng, H, th_av + 0.05, th_av + np.pi * 0.4, ph_b + 0.05, ph_b + 0.2, 0.6 * r_lm, 0.5)
        vessels.append(('RI', pts, r))
    for name, (th, ph, r), n, dth, dph in (('D', lad, rng.integers(2, 4), (0.25, 0.45), (0.6, 1.1)),
                                            ('OM', lcx, rng.integers(2, 4), (0.35, 0.6), (-0.15, 0.25))):
        for k, tb in enumerate(np.sort(rng.uniform(0.15, 0.7, n))):
            i = int(tb * (len(th) - 1))
            pts, rb_, _, _ = _groove_path(rng, H, th[i], min(th[i] + np.pi * rng.uniform(*dth), 0.95 * np.pi), ph[i],
                                          ph[i] + rng.uniform(*dph), max(0.7 * r[i], 0.55), 0.5, tort=0.8)
            vessels.append((f'{name}{k + 1}', pts, rb_))
    # right: ostium on the right-anterior sinus, the RCA in the right AV groove, then PDA and posterolateral branch
    dr_ = _unit(np.array([0.55, 1, 0.05]) + rng.uniform(-0.2, 0.2, 3))
    ost_r = root + dr_ * (rs - 0.5)
    ph_r0 = -rng.uniform(0.25, 0.55)
    r0_pt = H.surface(np.array([th_av]), np.array([ph_r0]), np.array([2.3]))[0]
    r_rca = rng.uniform(1.7, 2.0)
    pts, r = _ostial(ost_r, dr_, r0_pt, r_rca, 0.95 * r_rca)
    vessels.append(('RCA0', pts, r))
    ph_end = -np.pi + rng.uniform(-0.15, 0.25)
    pts, r, t, (th3, ph3) = _groove_path(rng, H, th_av, th_av + rng.uniform(-0.05, 0.1), ph_r0, ph_end, 0.92 * r_rca, 0.9)
    vessels.append(('RCA', pts, r))
    pts, r, _, _ = _groove_path(rng, H, th3[-1], np.pi * rng.uniform(0.78, 0.92), ph3[-1], ph3[-1] + rng.uniform(-0.1, 0.1),
                                0.85, 0.5)
    vessels.append(('PDA', pts, r))
    pts, r, _, _ = _groove_path(rng, H, th3[-1], th3[-1] + np.pi * rng.uniform(0.15, 0.3), ph3[-1], ph3[-1] - 0.6, 0.75,
                                0.5, tort=0.8)
    vessels.append(('PLB', pts, r))
    for k, tb in enumerate(np.sort(rng.uniform(0.3, 0.7, rng.integers(1, 3)))):
        i = int(tb * (len(th3) - 1))
        pts, r, _, _ = _groove_path(rng, H, th3[i], th3[i] + np.pi * rng.uniform(0.35, 0.55), ph3[i],
                                    ph3[i] + rng.uniform(-0.2, 0.2), 0.65, 0.5, tort=0.8)
        vessels.append((f'AM{k + 1}', pts, r))

    # a stenosis on a proximal/mid main vessel: the lumen narrowed, soft plaque around it
    mains = {n: k for k, (n, _, _) in enumerate(vessels) if n in ('LAD', 'LCX', 'RCA')}
    sten_name = rng.choice(list(mains)); k = mains[sten_name]
    name, pts, r = vessels[k]
    s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    s0, width, sev = rng.uniform(0.1, 0.5) * s[-1], rng.uniform(1.5, 3.0), rng.uniform(0.4, 0.75)
    outer = r.copy()
    r = np.maximum(r * (1 - sev * np.exp(-((s - s0) / width) ** 2)), np.minimum(r, 0.45))  # a lumen stays open
    vessels[k] = (name, pts, r)
    near = np.abs(s - s0) < 2.5 * width
    plaque = np.zeros(shape, bool)
    _paint(g, pts[near], outer[near] + 0.3, plaque)
    sten_pt = pts[np.argmin(np.abs(s - s0))]

    # the lumen, at the aorta's contrast with distal fall-off
    fall = rng.uniform(0.05, 0.15)
    for name, pts, r in vessels:
        s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        depth = (s + (0 if name in ('LM', 'RCA0', 'RCA', 'LAD', 'LCX') else 30)) / 120
        _paint(g, pts, r, lumen, cor_hu, HU['coronary'] * (1 - fall * np.clip(depth, 0, 1)))
    soft = plaque & ~lumen
    img[soft] = HU['soft_plaque']
    # calcified plaques: eccentric, pressing into the lumen; one at the stenosis; some calcium on the aortic root
    calc = np.zeros(shape, bool); calc_hu = np.zeros(shape, np.float32)
    sites = [(sten_pt, vessels[k][1], vessels[k][2])]
    for _ in range(rng.integers(1, 4)):
        name, pts, r = vessels[mains[rng.choice(list(mains))]]
        i = int(rng.uniform(0.05, 0.5) * (len(pts) - 1)); sites.append((pts[i], pts, r))
    n_calc = 0
    for p, pts, r in sites:
        i = int(np.argmin(np.linalg.norm(pts - p, axis=1)))
        tdir = _unit(pts[min(i + 3, len(pts) - 1)] - pts[max(i - 3, 0)])
        nrm = _unit(np.cross(tdir, rng.normal(size=3)))
        pr = rng.uniform(0.5, 1.5)  # 1-3 mm across
        c = p + nrm * (0.7 * r[i] + 0.8 * pr)  # presses 30 % of the radius into the lumen
        along = np.linspace(-pr, pr, 5)[:, None] * tdir
        _paint(g, c + along, pr * 0.8, calc, calc_hu, rng.uniform(800, 1200)); n_calc += 1
    for _ in range(rng.integers(0, 3)):
        c = root + _unit(rng.normal(size=3) * [1, 1, 0.3]) * (1.2 * ra + 0.5)
        _paint(g, c[None], rng.uniform(0.8, 1.8), calc, calc_hu, rng.uniform(700, 1100))
    inside_aorta = aorta | (d_asc < ra + wall) | (d_root < 1.2 * ra + wall)
    lumen &= ~inside_aorta
    img[lumen] = cor_hu[lumen]
    img[calc] = calc_hu[calc]
    label = lumen & ~calc
    cc, ncc = ndimage.label(label, np.ones((3, 3, 3), bool))   # specks cut off by calcium or the grid: not annotated
    if ncc > 1:
        size = np.bincount(cc.ravel()); small = size * float(np.prod(sp)) < 2.0; small[0] = False
        label &= ~small[cc]

    # --- acquisition: soft-tissue texture, partial-volume blur, correlated noise ---
    img[np.broadcast_to(body2, shape)] += 4 * _smooth_field(rng, shape, (5, 5, 4))[np.broadcast_to(body2, shape)]
    blur = rng.uniform(0.35, 0.6)
    img = ndimage.gaussian_filter(img, [blur / sp[0], blur / sp[1], 1.2 * blur / sp[2]], mode='nearest')
    noise_sd = rng.uniform(20, 40)
    nz = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), [0.7, 0.7, 0.5])
    img += nz * np.float32(noise_sd / nz.std())
    out = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    lab = label.astype(np.uint8)
    if not return_info: return out, lab, aff
    info = dict(seed=seed, shape=list(shape), spacing=[round(float(v), 4) for v in sp], orientation=orientation,
                vessel_fraction=round(float(lab.mean()), 5), vessel_voxels=int(lab.sum()),
                hu={k: round(float(v)) for k, v in HU.items()}, aorta_diameter_mm=round(2 * ra, 1),
                noise_sd_hu=round(noise_sd, 1), blur_sigma_mm=round(blur, 2), stenosis=dict(
                    vessel=str(sten_name), severity=round(float(sev), 2), at_mm=round(float(s0), 1),
                    world_mm=[round(float(v), 1) for v in sten_pt]),
                calcified_plaques=n_calc, branches=[n for n, _, _ in vessels],
                tree_length_mm=round(sum(float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) for _, p, _ in vessels), 1))
    return out, lab, aff, info


def _save(arr, affine, path, slope=1.0, inter=0.0):
    import nibabel as nib
    raw = arr if (slope, inter) == (1.0, 0.0) else np.rint((arr.astype(np.float32) - inter) / slope).astype(arr.dtype)
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(slope, inter); img.header.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1); img.set_sform(affine, code=1)
    img.header.set_xyzt_units('mm', 'sec')
    nib.save(img, str(path))


def write_folder(folder, n_cases:int, seed:int=0, vary:bool=True, progress:bool=False, **kw) -> list[dict]:
    """Write `n_cases` cases to `folder` as `1.img.nii.gz` + `1.label.nii.gz`, ... (ImageCAS names) and `cases.json`.
    `vary`: each case's in-plane spacing x0.92-1.08 and slice spacing x0.9-1.1, and its storage (`STORAGE`) drawn;
    `kw` goes to `make_case` (shape, spacing, orientation). Returns the cases' info"""
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(1, n_cases + 1):
        t = time.perf_counter()
        rng = np.random.default_rng([seed, i])
        args = dict(kw)
        sp = np.asarray(args.pop('spacing', (0.42, 0.42, 0.7)), float)
        if vary:
            f = rng.uniform(0.92, 1.08); sp = sp * [f, f, rng.uniform(0.9, 1.1)]
        store = rng.choice(list(STORAGE)) if vary else 'hu'
        img, lab, aff, info = make_case(seed * 1000 + i, spacing=tuple(sp), return_info=True, **args)
        _save(img, aff, folder/f"{i}.img.nii.gz", *STORAGE[store])
        _save(lab, aff, folder/f"{i}.label.nii.gz")
        infos.append(dict(case=i, image=f"{i}.img.nii.gz", label=f"{i}.label.nii.gz", storage=store,
                          seconds=round(time.perf_counter() - t, 2), **info))
        if progress: print(f"case {i}: {info['orientation']}, {store}, vessel {100 * info['vessel_fraction']:.2f} %, "
                           f"stenosis {info['stenosis']['vessel']} {info['stenosis']['severity']:.0%}, "
                           f"{infos[-1]['seconds']} s", file=sys.stderr, flush=True)
    (folder/'cases.json').write_text(json.dumps(dict(generator='bench/realistic_ct.py', seed=seed, vary=vary,
                                                     cases=infos), indent=1) + '\n')
    return infos


def _to_ras(a, affine):
    "The array with its axes flipped to RAS (affines here are diagonal), and its spacing"
    d = np.diag(affine)[:3]
    return a[tuple(slice(None, None, -1) if v < 0 else slice(None) for v in d)], np.abs(d)


def preview(img, label, affine, path, title:str='', window=(-200, 600)):
    """A PNG of axial, coronal and sagittal slices through a vessel voxel, and an axial 10 mm slab MIP, in radiological
    display (patient's right on the left, anterior / superior up), CT window `window` HU, the label's contour in red"""
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    im, sp = _to_ras(np.asarray(img, np.float32), affine); lb, _ = _to_ras(np.asarray(label), affine)
    per_slice = lb.sum((0, 1)); k = int(np.argmax(per_slice))
    ii, jj = np.nonzero(lb[:, :, k]); c = np.array([ii.mean(), jj.mean()])
    n = int(np.argmin((ii - c[0]) ** 2 + (jj - c[1]) ** 2)); i, j = int(ii[n]), int(jj[n])
    half = max(1, int(round(5 / sp[2])))
    mip = im[:, :, max(0, k - half):k + half + 1].max(2); mipl = lb[:, :, max(0, k - half):k + half + 1].max(2)
    # (2-D array with rows = screen up->down, cols = screen left->right, aspect)
    views = [('axial z=%d' % k, im[:, :, k].T[::-1, ::-1], lb[:, :, k].T[::-1, ::-1], sp[1] / sp[0], (i, j)),
             ('coronal y=%d' % j, im[:, j, :].T[::-1, ::-1], lb[:, j, :].T[::-1, ::-1], sp[2] / sp[0], (i, k)),
             ('sagittal x=%d' % i, im[i, :, :].T[::-1, ::-1], lb[i, :, :].T[::-1, ::-1], sp[2] / sp[1], (j, k)),
             ('axial 10 mm slab MIP', mip.T[::-1, ::-1], mipl.T[::-1, ::-1], sp[1] / sp[0], (i, j))]
    fig, axs = plt.subplots(2, 2, figsize=(12, 12))
    for ax, (name, a, l, asp, _) in zip(axs.ravel(), views):
        ax.imshow(a, cmap='gray', vmin=window[0], vmax=window[1], aspect=asp, interpolation='nearest')
        if l.any(): ax.contour(l.astype(float), levels=[0.5], colors='red', linewidths=0.6)
        ax.set_title(name, fontsize=9); ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(title or f"window {window[0]}..{window[1]} HU; red: label contour", fontsize=10)
    fig.tight_layout(); Path(path).parent.mkdir(parents=True, exist_ok=True); fig.savefig(path, dpi=110); plt.close(fig)
    return Path(path)


def _tuple(s, typ):
    return tuple(typ(v) for v in s.split(','))


def main(argv=None):
    p = argparse.ArgumentParser(description="Write realistic synthetic coronary CTA cases (ImageCAS layout)")
    p.add_argument('out', help="folder to write (N.img.nii.gz, N.label.nii.gz, cases.json)")
    p.add_argument('--cases', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--shape', type=lambda s: _tuple(s, int), default=(168, 168, 112), help="voxels, e.g. 168,168,112")
    p.add_argument('--spacing', type=lambda s: _tuple(s, float), default=(0.42, 0.42, 0.7), help="mm, e.g. 0.42,0.42,0.7")
    p.add_argument('--no-vary', action='store_true', help="same spacing and storage (int16 HU) for every case")
    p.add_argument('--preview', metavar='FILE', help="a PNG of the first case: orthogonal slices through a vessel")
    a = p.parse_args(argv)
    infos = write_folder(a.out, a.cases, a.seed, vary=not a.no_vary, progress=True, shape=a.shape, spacing=a.spacing)
    fr = [c['vessel_fraction'] for c in infos]
    print(f"wrote {len(infos)} cases to {a.out}: vessel fraction {100 * min(fr):.2f}-{100 * max(fr):.2f} %, "
          f"{np.mean([c['seconds'] for c in infos]):.1f} s a case", file=sys.stderr)
    if a.preview:
        import nibabel as nib
        im, lb = nib.load(str(Path(a.out)/'1.img.nii.gz')), nib.load(str(Path(a.out)/'1.label.nii.gz'))
        c = infos[0]
        preview(np.asarray(im.dataobj), np.asarray(lb.dataobj), im.affine, a.preview,
                title=f"case 1 ({c['orientation']}, {c['storage']}, spacing {c['spacing']} mm, noise {c['noise_sd_hu']} HU, "
                      f"stenosis {c['stenosis']['vessel']} {c['stenosis']['severity']:.0%}); window -200..600 HU; "
                      "red: label contour")
        print(f"preview: {a.preview}", file=sys.stderr)


if __name__ == '__main__':
    main()
