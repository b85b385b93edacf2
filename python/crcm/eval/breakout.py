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
PADDLE_MIN_W, PADDLE_MAX_W = 5.0, 24.0  # visible width: at a wall / with the ball beside it
FIELD_TOP = 32.0  # below the top wall
WALL_GREY, WALL_TEAL = (142.0, 142.0, 142.0), (66.0, 158.0, 130.0)  # side walls; teal by the paddle
OBJECT_RED = np.array([200.0, 72.0, 72.0], np.float32)  # the ball's and the paddle's colour
RED_SPAN = float(OBJECT_RED[0] - OBJECT_RED[1])  # their redness R − G when fully covered
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


def _runs(on_W: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` of the runs of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on_W.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _components(on_H_W: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-connected components of a sparse mask as ``(ys, xs)`` index arrays (few pixels: the
    callers give up before flooding a noisy frame)."""
    ys, xs = np.nonzero(on_H_W)
    left = set(zip(ys.tolist(), xs.tolist(), strict=True))
    out = []
    while left:
        stack = [left.pop()]
        blob = list(stack)
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    p = (y + dy, x + dx)
                    if p in left:
                        left.remove(p)
                        stack.append(p)
                        blob.append(p)
        arr = np.array(blob)
        out.append((arr[:, 0], arr[:, 1]))
    return out


class BreakoutDetector:
    """Reads paddle x, ball position and brick count from ``uint8 [h, w, 3]`` frames.

    Args:
        frame_hw: the frames' size (h, w), area-resized from the native 210 × 160.
    """

    # Red coverage: a fully covered pixel has redness 128 (200 − 72). The ball's brightest
    # pixel at 64×64 is at least 0.24 covered (≈31 redness) wherever it sits: a blob needs a
    # peak of 0.2 and grows over pixels of 0.1 (≈13, above the uint8 noise of a good model).
    BALL_ALPHA, BALL_PEAK = 0.1, 0.2
    # How far (per channel, grey levels) a pixel may be from a mix of the objects' red and
    # black before it counts as clutter, and the most a pixel can be "covered" by red.
    COLOUR_TOL = 32.0
    MAX_ALPHA = 1.25

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
        # The paddle rows with one row above and one below (the check that the paddle is not
        # part of a taller shape), as indices into the frame.
        band = self._paddle_rows
        self._paddle_band = np.concatenate(
            [[max(band[0] - 1, 0)], band, [min(band[-1] + 1, h - 1)]]
        )
        # Red coverage of one fully covered paddle column, summed over the paddle rows, and how
        # many off-colour pixels the paddle rows may hold before they count as unreadable.
        self._paddle_col_mass = (PADDLE_ROWS[1] - PADDLE_ROWS[0]) * self.sy
        self._paddle_bg = self._wall_redness()[self._paddle_band]
        self._paddle_clutter = max(1, int(0.03 * len(band) * in_play.sum()))
        # The ball: its red coverage in frame pixels, how many pixels it can touch, and the
        # largest box (rows, columns) it can span with a pixel of blur.
        self._ball_mass = BALL_HW[0] * BALL_HW[1] * self.sx * self.sy
        box_h, box_w = int(np.ceil(BALL_HW[0] * self.sy)), int(np.ceil(BALL_HW[1] * self.sx))
        self._ball_pixels = (box_h + 1) * (box_w + 1)
        self._ball_box = (box_h + 2, box_w + 2)
        self._ball_search = self._ball_rows[:, None] & in_play[None, :]
        # The open playfield (black in every real frame): rows between the top wall and the
        # bricks and between the bricks and the paddle, inside the side walls.
        open_rows = ((row_lo >= FIELD_TOP) & (row_hi <= BRICK_TOP)) | (
            (row_lo >= BRICK_TOP + BRICK_ROWS * BRICK_H) & (row_hi <= PADDLE_ROWS[0])
        )
        self._open_field = open_rows[:, None] & in_play[None, :]
        self._field_clutter = max(2, int(0.0025 * self._open_field.sum()))

    def _wall_redness(self) -> np.ndarray:
        """``float [h, w]``: the signed red coverage (R − G) / 128 that the side walls alone
        give each frame pixel. The columns straddling a wall mix its colour into whatever is
        drawn beside it: the right wall is red beside the paddle rows (it would read as paddle)
        and the left one teal (it would hide part of the paddle), so the paddle reading takes
        this away before it measures anything."""
        native = np.zeros((*NATIVE_HW, 3), np.float64)
        left, right = slice(0, int(PLAY_X[0])), slice(int(PLAY_X[1]), NATIVE_HW[1])
        native[int(FIELD_TOP) : int(PADDLE_ROWS[0]), left] = WALL_GREY
        native[int(FIELD_TOP) : int(PADDLE_ROWS[0]), right] = WALL_GREY
        native[int(PADDLE_ROWS[0]) : int(PADDLE_ROWS[0]) + 7, left] = WALL_TEAL
        native[int(PADDLE_ROWS[0]) : int(PADDLE_ROWS[0]) + 6, right] = OBJECT_RED
        rows = np.einsum("yY,YXc->yXc", self._wy, native)
        frame = np.einsum("xX,yXc->yxc", self._wx, rows)
        return (frame[..., 0] - frame[..., 1]) / RED_SPAN

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
    #
    # Both are found only as ONE compact object of the right colour and size in a clean part of
    # the screen, or not at all: a detector that returns *something* on any frame makes a
    # world model that draws speckle look as if it drew a paddle (issue 16). A frame pixel is
    # read as a mix of the object's red and the background: its coverage is alpha = (R − G) /
    # 128 (the walls, score and the non-red bricks have R − G ≤ 0, so they do not add to it),
    # and what is left after taking alpha × red away must be background. In the paddle rows and
    # the open playfield the background is black, so anything else there (a speck of another
    # colour, a pixel redder than the red itself) is clutter.

    def _alpha(
        self, frame_H_W_C: np.ndarray, wall_H_W: np.ndarray | float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(alpha [H, W], foreign [H, W])``: red coverage of each pixel (less the walls'
        ``wall_H_W``) and whether the pixel is *not* a mix of the objects' red and black
        (within ``COLOUR_TOL`` per channel; meaningful away from the walls)."""
        f = frame_H_W_C.astype(np.float32)
        alpha = np.clip((f[..., 0] - f[..., 1]) / RED_SPAN - wall_H_W, 0.0, None)
        rest = f - alpha[..., None] * OBJECT_RED
        foreign = (np.abs(rest) > self.COLOUR_TOL).any(-1) | (alpha > self.MAX_ALPHA)
        return alpha, foreign

    def paddle_x(self, frame_H_W_C: np.ndarray) -> float | None:
        """Visible paddle centre x (native pixels), or None unless the paddle rows hold exactly
        one compact paddle-sized red object (a ball-sized one beside it is allowed) and
        nothing else."""
        alpha, foreign = self._alpha(frame_H_W_C[self._paddle_band], self._paddle_bg)
        band, above, below = alpha[1:-1], alpha[0], alpha[-1]
        # Clutter is judged in the columns fully inside the walls; the two columns that straddle
        # a wall mix in its colour, so there only the red coverage is read.
        foreign = foreign[1:-1] & self._ball_cols
        if foreign.sum() > self._paddle_clutter:
            return None  # the paddle rows are not clean: no single object can be read there
        band = np.where(foreign, 0.0, np.minimum(band, 1.0))
        mass_W = band.sum(0) * self._play_cols  # alpha-mass per column, in frame pixels
        runs = _runs(mass_W > 0.3 * self._paddle_col_mass)
        if not runs:
            return None
        masses = [mass_W[max(lo - 1, 0) : hi + 1].sum() for lo, hi in runs]
        best = int(np.argmax(masses))
        lo, hi = max(runs[best][0] - 1, 0), min(runs[best][1] + 1, len(mass_W))
        mass = masses[best]
        # Width that mass would have as a solid 4-row bar, and the run's extent (native px).
        width = mass / self._paddle_col_mass / self.sx
        extent = (runs[best][1] - runs[best][0]) / self.sx
        others = sum(masses) - mass
        if not (PADDLE_MIN_W <= width <= PADDLE_MAX_W) or extent > width + 2 / self.sx + 4:
            return None  # too small, too long, or a faint smear rather than a solid bar
        if others > 1.5 * self._ball_mass:
            return None  # a second paddle-sized object (or junk) in the paddle rows
        # Not part of a taller shape: the rows just above and below hold at most a ball.
        if max(above[lo:hi].sum(), below[lo:hi].sum()) > 0.5 * mass:
            return None
        cols = np.arange(lo, hi) + 0.5
        return float((cols * mass_W[lo:hi]).sum() / mass_W[lo:hi].sum() / self.sx)

    def ball_xy(self, frame_H_W_C: np.ndarray) -> tuple[float, float] | None:
        """Ball centre (x, y) in native pixels, or None unless the searched rows hold exactly
        one compact ball-sized red object and the open playfield is otherwise clean."""
        alpha, foreign = self._alpha(frame_H_W_C)
        if (foreign & self._open_field).sum() > self._field_clutter:
            return None  # speckle or noise over the playfield: no single object to read
        # The brick rows' own colours are background there, not clutter: only their red counts.
        alpha = np.where(self._ball_search, np.minimum(alpha, self.MAX_ALPHA), 0.0)
        strong = alpha >= self.BALL_PEAK
        n_strong = int(strong.sum())
        if n_strong == 0 or n_strong > 4 * self._ball_pixels:
            return None
        # Blobs grow over faint pixels too (a ball's edge pixels are faint); a blob is an object
        # if it has a clear peak and at least a third of a ball's coverage, so faint noise of
        # a good model is no object while a speck of red is.
        objects = []
        for ys, xs in _components(alpha >= self.BALL_ALPHA):
            mass, peak = alpha[ys, xs].sum(), alpha[ys, xs].max()
            if peak >= self.BALL_PEAK and mass >= 0.3 * self._ball_mass:
                objects.append((mass, ys, xs))
        if len(objects) != 1:
            return None  # no ball, or several red objects: the ball is not one object here
        mass, ys, xs = objects[0]
        if not 0.35 * self._ball_mass <= mass <= 2.0 * self._ball_mass:
            return None
        keep = strong[ys, xs]
        ys, xs = ys[keep], xs[keep]
        if np.ptp(ys) + 1 > self._ball_box[0] or np.ptp(xs) + 1 > self._ball_box[1]:
            return None  # not compact: a streak or smear, not a 2 × 4 ball
        # Centroid over the blob's box grown by a pixel: faint edge pixels carry position too.
        y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
        x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
        patch = alpha[y0:y1, x0:x1]
        gy, gx = np.mgrid[y0:y1, x0:x1]
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
