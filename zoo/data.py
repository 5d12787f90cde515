"""scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32 for LeNet-5.

Needs only numpy and scikit-learn (no torch, no download: ``sklearn.datasets.load_digits`` reads
a file shipped inside scikit-learn), so tests can compute held-out accuracy of the exported ONNX
model through onnxruntime.

Preprocessing, in order:

1. ``load_digits()``: 1797 images of 8x8 pixels with integer intensities 0..16, labels 0..9.
2. Scale to [0, 1] by dividing by 16.
3. Upsample 8x8 -> 32x32 by separable *bilinear* interpolation with aligned corners: output
   pixel i (0..31) samples the input at position ``i * 7 / 31`` along each axis, so the corner
   pixels of input and output coincide. Implemented as ``W @ img @ W.T`` with a fixed 32x8
   interpolation matrix ``W`` (:func:`bilinear_matrix`); this equals
   ``torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=True)``
   and ``scipy.ndimage.zoom(img, 32 / 8, order=1, grid_mode=False)``. Values stay in [0, 1].
4. Split with ``sklearn.model_selection.train_test_split(test_size=0.25, random_state=0,
   stratify=labels, shuffle=True)``: 1347 training and 450 held-out images.

Arrays are float32 shaped (N, 1, 32, 32); labels are int64 shaped (N,).
"""

from __future__ import annotations

import numpy as np

SIZE = 32
TEST_SIZE = 0.25
RANDOM_STATE = 0
SPLIT_DESCRIPTION = (
    "sklearn.datasets.load_digits (1797 8x8 images, pixels/16 -> [0, 1], bilinear align-corners "
    "upsampling to 32x32); sklearn.model_selection.train_test_split(test_size=0.25, random_state=0, "
    "stratify=labels)"
)


def bilinear_matrix(n_in: int = 8, n_out: int = SIZE) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with aligned corners (rows sum to 1)."""
    pos = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
    frac = pos - lo
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    w[rows, lo] = 1.0 - frac
    w[rows, lo + 1] += frac
    return w


def upsample(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear (align-corners) upsampling of (N, h, w) images to (N, size, size), float64."""
    images = np.asarray(images, dtype=np.float64)
    wh = bilinear_matrix(images.shape[1], size)
    ww = bilinear_matrix(images.shape[2], size)
    return np.einsum("ih,nhw,jw->nij", wh, images, ww)


def load_digits_32x32_all() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 (N, 1, 32, 32) in [0, 1] and int64 labels (N,), unsplit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0
    x = upsample(images)[:, None, :, :].astype(np.float32)
    y = digits.target.astype(np.int64)
    return x, y


def load_digits_32x32() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed split: (x_train, y_train, x_test, y_test); x float32 (N, 1, 32, 32), y int64 (N,).

    1347 training and 450 held-out samples (stratified, see the module docstring).
    """
    from sklearn.model_selection import train_test_split

    x, y = load_digits_32x32_all()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=RANDOM_STATE, stratify=y, shuffle=True
    )
    return x_train, y_train, x_test, y_test


if __name__ == "__main__":
    xtr, ytr, xte, yte = load_digits_32x32()
    print(f"train {xtr.shape} {xtr.dtype}, test {xte.shape} {xte.dtype}, range [{xtr.min()}, {xtr.max()}]")
    print("train class counts", np.bincount(ytr).tolist())
    print("test  class counts", np.bincount(yte).tolist())


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): x float32 (N, 8, 8) in [0, 1].

    Same split as ``load_digits_32x32`` (``train_test_split(test_size=0.25, random_state=0,
    stratify=labels)``: 1347 training and 450 held-out images, in the same order); the rows of an
    image are the time steps, its 8 columns the features. numpy and scikit-learn only.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=RANDOM_STATE, stratify=y, shuffle=True
    )
    return x_train, y_train, x_test, y_test
