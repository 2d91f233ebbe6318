"""CT volumes written the way other tools write them, by a generator that shares none of the kit's phantom code:
a chest with air, fat, muscle, a blood pool, a spine brighter than contrast, calcium beside the vessels, and two
curved vessels as the label. Options give what real folders hold: a crop to the heart (no air), int16 with a
rescale slope and intercept, voxel axes running L-P-S, anisotropic odd shapes, 0/255 labels, NRRD, a label header
with its x axis reversed, NaN inside the body or around the field of view."""
import numpy as np
import nibabel as nib
import nrrd


def chest(shape=(37, 41, 29), spacing=(0.45, 0.45, 0.6), seed=0, crop=False):
    "(HU float32, label uint8) of one synthetic chest, voxel axes x, y, z; `crop`: the heart only, no air"
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing='ij')
    ext = np.array(shape) * spacing / 2
    hu = np.full(shape, -1000.0)
    body = (x / (0.95 * ext[0]))**2 + (y / (0.8 * ext[1]))**2 < 1
    hu[body] = -100                                                    # fat
    hu[body & ((x / (0.85 * ext[0]))**2 + (y / (0.7 * ext[1]))**2 < 1)] = 45  # muscle and myocardium
    pool = (x / (0.35 * ext[0]))**2 + ((y - 0.1 * ext[1]) / (0.3 * ext[1]))**2 + (z / (0.8 * ext[2]))**2 < 1
    hu[pool] = 330                                                     # blood pool at the vessels' HU
    hu[(x**2 + (y + 0.6 * ext[1])**2) < (0.12 * ext[0])**2] = 800      # a spine brighter than contrast
    label = np.zeros(shape, bool)
    for sign, phase in ((1, 0.0), (-1, 1.3)):                          # two curved vessels beside the pool
        t = z / ext[2]
        cx = sign * 0.5 * ext[0] + 0.08 * ext[0] * np.sin(3 * t + phase)
        cy = 0.1 * ext[1] + 0.45 * ext[1] * np.cos(2 * t + phase)
        label |= (x - cx)**2 + (y - cy)**2 < (1.1 - 0.3 * (t + 1) / 2)**2
    hu[label] = 380 + rng.normal(0, 15, label.sum())
    box = tuple(slice(max(0, i - 1), i + 2) for i in np.argwhere(label)[int(label.sum()) // 2])
    hu[box] = np.where(label[box], hu[box], 950)                      # calcium beside a vessel, not in the label
    hu += rng.normal(0, 20, shape)
    if crop: hu = np.maximum(hu, -150 + rng.normal(0, 5, shape))  # a heart crop: no air anywhere
    return hu.astype(np.float32), label.astype(np.uint8)


def lps_affine(spacing, origin=(12.5, -30.0, 4.0)):
    "A NIfTI affine whose voxel axes run toward left, posterior and superior (RAS world: x and y negative)"
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]); a[:3, 3] = origin
    return a


def write_case(folder, name, hu, label, spacing, *, lps=True, int16=True, label_255=True, fmt='nii',
               flip_label_x=False):
    "Write `name.img` / `name.label` (ImageCAS names) in `folder`; return `{image, label}`"
    folder.mkdir(parents=True, exist_ok=True)
    lab = (label * (255 if label_255 else 1)).astype(np.uint8)
    if fmt == 'nrrd':
        hdr = {'space': 'left-posterior-superior', 'space directions': np.diag(spacing).tolist(),
               'space origin': [-12.5, 30.0, 4.0]}
        paths = folder/f"{name}.img.nrrd", folder/f"{name}.label.nrrd"
        nrrd.write(str(paths[0]), hu.astype(np.int16) if int16 else hu, hdr)
        nrrd.write(str(paths[1]), lab, {**hdr, **({'space directions': np.diag([-spacing[0], *spacing[1:]]).tolist()}
                                                 if flip_label_x else {})})
        return dict(image=str(paths[0]), label=str(paths[1]))
    aff = lps_affine(spacing) if lps else np.diag([*spacing, 1.0])
    if int16:  # stored as scanners store it: (HU + 1024) / 0.5 in int16, the header's slope and intercept undo it
        img = nib.Nifti1Image(np.round((hu + 1024) / 0.5).astype(np.int16), aff)
        img.header.set_slope_inter(0.5, -1024)
    else: img = nib.Nifti1Image(hu, aff)
    laff = aff.copy()
    if flip_label_x: laff[:, 0] = -laff[:, 0]  # the label's header says x runs the other way
    paths = folder/f"{name}.img.nii.gz", folder/f"{name}.label.nii.gz"
    nib.save(img, str(paths[0])); nib.save(nib.Nifti1Image(lab, laff), str(paths[1]))
    return dict(image=str(paths[0]), label=str(paths[1]))
