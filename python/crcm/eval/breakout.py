"""Breakout objects read from frames, the RAM bytes that validate them, and frame metrics.

The detector works on frames of any size (area-resized from the native 210 × 160) and reports
positions in *native* pixels, so errors are comparable across resolutions; a native pixel is
``160 / w`` frame pixels wide and ``210 / h`` tall. It is validated against the emulator's RAM
on real frames (tests/python/eval/test_breakout_eval.py): a detector that only agreed with
itself could not tell a model's mistakes from its own.

Native layout (continuous coordinates, pixel i spans [i, i+1)):
  - score rows 5–14, top wall 17–31 (grey), side walls x < 8 and x ≥ 152;
  - bricks: 6 rows × 18 columns, row r spans y ∈ [57 + 6r, 63 + 6r), column c x ∈ [8 + 8c,
    16 + 8c); colours red, orange, dark orange, yellow, green, blue from the top;
  - ball: 2 × 4 pixels, red (200, 72, 72); paddle: 16 × 4 (8 wide after the ball reaches the
    top wall), same red, rows 189–192.
Red (R − G > 0) singles out the ball, the paddle and the two top brick rows' reds/oranges:
the walls (grey), score (grey), yellow/green/blue bricks and the bottom wall (teal) have
R − G ≤ 0. So the ball is searched everywhere except the red/orange brick rows (57–74) and the
paddle rows; while it is inside those rows the detector reports it as not visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crcm.data.atari import NATIVE_HW, _area_weights

__all__ = [
    "RAM_BALL_X",
    "RAM_BALL_Y",
    "RAM_PADDLE_X",
    "BreakoutDetector",
    "Objects",
    "dynamic_mask",
    "psnr",
    "ram_objects",
    "ssim_map",
]

# RAM bytes and their offsets to screen coordinates (fitted on emulator frames, then pinned by
# the detector-vs-RAM test): paddle left edge x = ram[72] − 47, ball left x = ram[99] − 49,
# ball top y = ram[101] + 9; ram[101] = 0 while no ball is in play.
RAM_PADDLE_X, RAM_BALL_X, RAM_BALL_Y = 72, 99, 101
PADDLE_ROWS = (189.0, 193.0)
BALL_HW = (4.0, 2.0)
PADDLE_W = 16.0
PLAY_X = (8.0, 152.0)  # inside the side walls
RED_BRICK_ROWS = (57.0, 75.0)  # red and orange brick rows: ball not searched there
BRICK_TOP, BRICK_H, BRICK_W, BRICK_ROWS, BRICK_COLS = 57, 6, 8, 6, 18
BRICK_COLOURS = np.array(
    [(200, 72, 72), (198, 108, 58), (180, 122, 48), (162, 162, 42), (72, 160, 72), (66, 72, 200)],
    np.float64,
)


_PINV: dict[tuple[int, int], np.ndarray] = {}


@dataclass(frozen=True)
class Objects:
    """Breakout's objects in native pixels (centres); ``None`` where not visible."""

    paddle_x: float | None
    ball_xy: tuple[float, float] | None
    bricks: int


def ram_objects(ram: np.ndarray) -> tuple[float, tuple[float, float] | None]:
    """Ground truth from RAM: the visible paddle centre x and the ball centre (x, y), native.

    The paddle can slide under the side walls; its *visible* part (clipped to the playfield)
    is what a frame shows, so that is what a frame detector is compared with. Paddle width
    is taken as 16 (the short paddle after a top-wall hit is not in RAM at a known byte; the
    tests skip those frames by the frame's own width).
    """
    left = float(ram[RAM_PADDLE_X]) - 47.0
    lo, hi = max(left, PLAY_X[0]), min(left + PADDLE_W, PLAY_X[1])
    ball = None
    if ram[RAM_BALL_Y] != 0:
        ball = (float(ram[RAM_BALL_X]) - 49.0 + BALL_HW[1] / 2, float(ram[RAM_BALL_Y]) + 9.0 + 2.0)
    return (lo + hi) / 2, ball


def _redness(frame_H_W_C: np.ndarray) -> np.ndarray:
    """``float32 [H, W]``: max(R − G, 0); positive only for the ball, paddle and red bricks."""
    f = frame_H_W_C.astype(np.float32)
    return np.clip(f[..., 0] - f[..., 1], 0.0, None)


class BreakoutDetector:
    """Reads paddle x, ball position and brick count from ``uint8 [h, w, 3]`` frames.

    Args:
        frame_hw: the frames' size (h, w), area-resized from the native 210 × 160.
    """

    # Redness of a fully covered pixel is 128 (200 − 72). The ball's faintest pixel at 64×64
    # is about 0.24 covered (≈31 redness); 12 stays well above uint8 noise of a good model.
    BALL_THRESHOLD = 12.0

    def __init__(self, frame_hw: tuple[int, int]) -> None:
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        h, w = self.frame_hw
        self.sy, self.sx = h / NATIVE_HW[0], w / NATIVE_HW[1]
        self._wy = _area_weights(NATIVE_HW[0], h)  # [h, 210]
        self._wx = _area_weights(NATIVE_HW[1], w)  # [w, 160]
        # Frame rows/columns by what native span they overlap.
        row_lo = np.arange(h) / self.sy
        row_hi = (np.arange(h) + 1) / self.sy
        col_lo, col_hi = np.arange(w) / self.sx, (np.arange(w) + 1) / self.sx
        self._paddle_rows = np.flatnonzero((row_hi > PADDLE_ROWS[0]) & (row_lo < PADDLE_ROWS[1]))
        in_play = (col_lo >= PLAY_X[0] - 1e-9) & (col_hi <= PLAY_X[1] + 1e-9)
        self._ball_rows = (row_hi <= RED_BRICK_ROWS[0]) | (
            (row_lo >= RED_BRICK_ROWS[1]) & (row_hi <= PADDLE_ROWS[0])
        )
        self._ball_cols = in_play
        self._play_cols = (col_hi > PLAY_X[0]) & (col_lo < PLAY_X[1])
        self._brick_solver()
        # Expected redness mass of a full paddle in frame pixels (for presence).
        self._paddle_mass = 128.0 * PADDLE_W * 4.0 * self.sx * self.sy

    # -- bricks: linear unmixing ----------------------------------------------------------------

    def _brick_solver(self) -> None:
        """Precomputes a least-squares map from the brick band's pixels to 108 brick weights.

        A resized frame is linear in the native one, so each brick contributes a fixed pattern
        (its colour times its area coverage) to the frame pixels around it; with 3 channels and
        more pixels than bricks the 108 occupancies are recoverable even where a frame pixel
        straddles two brick rows (a brick is 1.8 × 3.2 frame pixels at 64×64).
        """
        top, bottom = BRICK_TOP, BRICK_TOP + BRICK_ROWS * BRICK_H
        rows = np.flatnonzero(self._wy[:, top:bottom].sum(1) > 0)
        # Columns touching a side wall would mix in the wall's grey: use only clean ones.
        wall = self._wx[:, : int(PLAY_X[0])].sum(1) + self._wx[:, int(PLAY_X[1]) :].sum(1)
        cols = np.flatnonzero(wall == 0)
        patterns = []
        for r in range(BRICK_ROWS):
            wy = self._wy[rows][:, top + r * BRICK_H : top + (r + 1) * BRICK_H].sum(1)
            for c in range(BRICK_COLS):
                x0 = int(PLAY_X[0]) + c * BRICK_W
                wx = self._wx[cols][:, x0 : x0 + BRICK_W].sum(1)
                patterns.append(np.einsum("y,x,c->yxc", wy, wx, BRICK_COLOURS[r]).ravel())
        A = np.stack(patterns, axis=1)  # [pixels·3, 108]
        self._brick_rows, self._brick_cols = rows, cols
        key = self.frame_hw
        if key not in _PINV:  # torch's pinv: numpy's BLAS threads fight torch's for the cores
            At = torch.from_numpy(A)  # full column rank: the normal equations are exact
            _PINV[key] = torch.linalg.solve(At.T @ At, At.T).numpy()
        self._brick_pinv = _PINV[key]

    def brick_weights(self, frame_H_W_C: np.ndarray) -> np.ndarray:
        """``float [6, 18]`` brick occupancies (≈1 present, ≈0 gone), top row first."""
        band = frame_H_W_C[self._brick_rows][:, self._brick_cols].astype(np.float64)
        return (self._brick_pinv @ band.ravel()).reshape(BRICK_ROWS, BRICK_COLS)

    def bricks(self, frame_H_W_C: np.ndarray) -> int:
        """Number of bricks left (0…108)."""
        return int((self.brick_weights(frame_H_W_C) > 0.5).sum())

    # -- paddle and ball ---------------------------------------------------------------------

    def paddle_x(self, frame_H_W_C: np.ndarray) -> float | None:
        """Visible paddle centre x (native pixels), or None when no paddle is drawn."""
        red = _redness(frame_H_W_C[self._paddle_rows])
        mass_W = red.sum(0) * self._play_cols
        if mass_W.sum() < 0.25 * self._paddle_mass:
            return None
        # The heaviest contiguous run of columns: a ball next to the paddle is a separate run.
        on = mass_W > 0.15 * mass_W.max()
        best, best_mass, start = None, 0.0, None
        for x in range(len(on) + 1):
            if x < len(on) and on[x]:
                start = x if start is None else start
            elif start is not None:
                lo, hi = max(start - 1, 0), min(x + 1, len(on))  # partial edge pixels too
                m = mass_W[lo:hi].sum()
                if m > best_mass:
                    best, best_mass = (lo, hi), m
                start = None
        lo, hi = best
        cols = np.arange(lo, hi) + 0.5
        return float((cols * mass_W[lo:hi]).sum() / mass_W[lo:hi].sum() / self.sx)

    def ball_xy(self, frame_H_W_C: np.ndarray) -> tuple[float, float] | None:
        """Ball centre (x, y) in native pixels, or None when not visible to the detector."""
        red = _redness(frame_H_W_C)
        red[~self._ball_rows] = 0.0
        red[:, ~self._ball_cols] = 0.0
        y, x = np.unravel_index(int(red.argmax()), red.shape)
        if red[y, x] < self.BALL_THRESHOLD:
            return None
        # Centroid of the 3 × 3 neighbourhood: the ball spans at most 2 × 3 frame pixels.
        ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
        patch = red[ys, xs]
        gy, gx = np.mgrid[ys, xs]
        cy = float((patch * (gy + 0.5)).sum() / patch.sum())
        cx = float((patch * (gx + 0.5)).sum() / patch.sum())
        return cx / self.sx, cy / self.sy

    def __call__(self, frame_H_W_C: np.ndarray) -> Objects:
        if frame_H_W_C.shape != (*self.frame_hw, 3) or frame_H_W_C.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 [{self.frame_hw[0]}, {self.frame_hw[1]}, 3] frame, got "
                f"{frame_H_W_C.dtype} {list(frame_H_W_C.shape)}"
            )
        return Objects(
            self.paddle_x(frame_H_W_C), self.ball_xy(frame_H_W_C), self.bricks(frame_H_W_C)
        )


# ---------------------------------------------------------------------------------------------
# Frame metrics


PSNR_CAP_DB = 100.0  # identical frames: a finite cap keeps means meaningful


def psnr(a_N_H_W_C: np.ndarray, b_N_H_W_C: np.ndarray, mask_N_H_W: np.ndarray | None = None):
    """Per-frame PSNR in dB of uint8 frames (``float64 [N]``), over ``mask`` pixels if given.

    Capped at ``PSNR_CAP_DB`` for identical frames; NaN where a mask is empty.
    """
    err = (a_N_H_W_C.astype(np.float64) - b_N_H_W_C.astype(np.float64)) ** 2
    err = err.mean(-1)
    if mask_N_H_W is None:
        mse = err.reshape(len(err), -1).mean(1)
    else:
        m = mask_N_H_W.reshape(len(err), -1).astype(np.float64)
        count = m.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mse = (err.reshape(len(err), -1) * m).sum(1) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(255.0**2 / mse)
    return np.where(np.isnan(mse), np.nan, np.minimum(out, PSNR_CAP_DB))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x_N_H_W_C: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur over H and W with reflect padding (same size out)."""
    pad = len(g) // 2
    for axis in (1, 2):
        widths = [(0, 0)] * 4
        widths[axis] = (pad, pad)
        xp = np.pad(x_N_H_W_C, widths, mode="reflect")
        n = x_N_H_W_C.shape[axis]
        x_N_H_W_C = sum(g[k] * np.take(xp, np.arange(k, k + n), axis=axis) for k in range(len(g)))
    return x_N_H_W_C


def ssim_map(a_N_H_W_C: np.ndarray, b_N_H_W_C: np.ndarray) -> np.ndarray:
    """SSIM map ``float64 [N, H, W]`` (Wang et al. 2004: 11-tap Gaussian σ = 1.5, K1 = 0.01,
    K2 = 0.03, L = 255), averaged over RGB channels.

    The window is applied with reflect padding so the map covers every pixel — the dynamic
    region metric averages it over a mask. The whole-frame SSIM is the map's mean.
    """
    a, b = a_N_H_W_C.astype(np.float64), b_N_H_W_C.astype(np.float64)
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    var_a = _blur(a * a, g) - mu_a**2
    var_b = _blur(b * b, g) - mu_b**2
    cov = _blur(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(-1)


def dynamic_mask(frames_T_H_W_C: np.ndarray, dilate: int = 1) -> np.ndarray:
    """``bool [H, W]``: pixels that change anywhere in the ground-truth ``frames``, dilated by
    ``dilate`` pixels (a square neighbourhood), so a model that draws an object one pixel off
    is judged where it drew it too."""
    changed = (frames_T_H_W_C != frames_T_H_W_C[:1]).any(axis=(0, 3))
    if dilate > 0:
        t = torch.from_numpy(changed).float()[None, None]
        k = 2 * dilate + 1
        changed = F.max_pool2d(t, k, stride=1, padding=dilate)[0, 0].numpy() > 0
    return changed
