"""`TuckerConv2d`: a convolution whose kernel is in Tucker-2 form, with rank masks."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._misc import HIGHEST

HI = HIGHEST


def _pair(v, name):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(x, int) and x >= 1 for x in v):
        raise ValueError(
            f"TuckerConv2d: {name} must be a positive int or a pair; got {v!r}."
        )
    return v


def tucker2(kernel: np.ndarray, r_out: int, r_in: int):
    """Truncated Tucker-2 (HOSVD) of a kernel (out, in, *spatial): (u_out, core, u_in)
    with `kernel ~ einsum('oa,ib,ab...->oi...', u_out, u_in, core)`. Host-side."""
    k = np.asarray(kernel)
    o, i = k.shape[:2]
    uo = np.linalg.svd(k.reshape(o, -1), full_matrices=False)[0][:, :r_out]
    ui = np.linalg.svd(np.moveaxis(k, 1, 0).reshape(i, -1), full_matrices=False)[0]
    ui = ui[:, :r_in]
    core = np.einsum("oa,ib,oi...->ab...", uo, ui, k)
    return uo, core, ui


def tucker2_spectra(kernel: np.ndarray):
    """Mode-out and mode-in singular values of a kernel (out, in, *spatial)."""
    k = np.asarray(kernel)
    o, i = k.shape[:2]
    so = np.linalg.svd(k.reshape(o, -1), compute_uv=False)
    si = np.linalg.svd(np.moveaxis(k, 1, 0).reshape(i, -1), compute_uv=False)
    return so, si


def check_tucker_ranks(name, out_c, in_c, ksize, r_out, r_in):
    """Valid Tucker-2 ranks: 1 <= r_out <= min(out, r_in k), 1 <= r_in <= min(in,
    r_out k) with k the number of kernel taps."""
    for label, r in (("out", r_out), ("in", r_in)):
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(
                f"{name}: the {label} rank must be a positive int; got {r!r}."
            )
    if not (r_out <= min(out_c, r_in * ksize) and r_in <= min(in_c, r_out * ksize)):
        raise ValueError(
            f"{name}: ranks (out={r_out}, in={r_in}) are not valid Tucker-2 ranks for "
            f"{out_c} out / {in_c} in channels and {ksize} kernel taps: need "
            "r_out <= min(out, r_in * taps) and r_in <= min(in, r_out * taps)."
        )


class TuckerConv2d(eqx.Module):
    r"""A 2-D convolution whose kernel is in Tucker-2 form, with rank masks:

    $$W_{o,i,h,w} = \sum_{a,b} U^{out}_{o a}\, C_{a b h w}\, U^{in}_{i b},$$

    with orthonormal $U^{out} \in \mathbb{R}^{c_{out}\times r^{out}_{max}}$,
    $U^{in} \in \mathbb{R}^{c_{in}\times r^{in}_{max}}$ and a core
    $C \in \mathbb{R}^{r^{out}_{max}\times r^{in}_{max}\times k_h\times k_w}$. The
    spatial modes are kept full (they are 3 x 3 or 5 x 5 in practice; factoring them
    saves little), as in Kim et al.'s Tucker-2 compression of CNNs. Only the leading
    active columns (`mask_out`, `mask_in`, arrays) are used, so the ranks change
    without changing shapes (no recompilation), exactly like
    [`LowRankLinear`][jaxdecomp.lowrank.LowRankLinear]; `dlrt` trains both.

    The call runs three convolutions: $1\times1$ ($c_{in} \to r^{in}$), the core
    ($k_h\times k_w$, $r^{in}\to r^{out}$, with the stride, padding and dilation) and
    $1\times1$ ($r^{out}\to c_{out}$): $r^{in} c_{in} + r^{out} r^{in} k_h k_w +
    c_{out} r^{out}$ multiply-adds per output pixel instead of $c_{out} c_{in} k_h k_w$.

    **Arguments:**

    - `in_channels`, `out_channels`, `kernel_size` (int or pair).
    - `max_rank`: int or `(out, in)` pair: the static capacity. Valid Tucker-2 ranks
        need $r^{out} \le \min(c_{out}, r^{in} k_h k_w)$ and $r^{in} \le \min(c_{in},
        r^{out} k_h k_w)$ (`ValueError` otherwise).
    - `rank`: the initially active ranks (int or pair; default `max_rank`).
    - `stride`, `padding` (int, pair, or `"SAME"`/`"VALID"`), `dilation`,
        `use_bias`, `dtype`, `key`: as `eqx.nn.Conv2d`. The initial kernel is the
        truncated HOSVD of an `eqx.nn.Conv2d`-style random kernel.

    Called on an array of shape `(in_channels, height, width)` (use `jax.vmap` for
    batches), like `eqx.nn.Conv2d`.

    **Methods:** `rank` (a `(2,)` int array: out, in), `weight` (the dense kernel),
    `with_rank(r)`, `to_dense()` (an `eqx.nn.Conv2d`), `shrink()` (host-side export
    at the active ranks).

    **Derivatives:** an ordinary Equinox module (both modes); the masks are not
    differentiated.

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdecomp.lowrank import TuckerConv2d

    conv = TuckerConv2d(16, 32, 3, max_rank=(8, 6), padding=1, key=jax.random.key(0))
    y = conv(jnp.ones((16, 10, 10)))  # (32, 10, 10)
    ```

    **Reference:** Kim et al., "Compression of deep convolutional neural networks for
    fast and low power mobile applications", ICLR 2016; Zangrando et al.,
    "Rank-adaptive spectral pruning of convolutional layers during training", 2024.
    """

    u_out: Float[Array, "out r_out"]
    core: Float[Array, "r_out r_in kh kw"]
    u_in: Float[Array, "in r_in"]
    bias: Float[Array, " out"] | None
    mask_out: Float[Array, " r_out"]
    mask_in: Float[Array, " r_in"]
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    kernel_size: tuple[int, int] = eqx.field(static=True)
    stride: tuple[int, int] = eqx.field(static=True)
    padding: str | tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)
    dilation: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        max_rank,
        *,
        rank=None,
        stride=1,
        padding=0,
        dilation=1,
        use_bias: bool = True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        for label, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(
                    f"TuckerConv2d: {label} must be a positive int; got {v!r}."
                )
        kh, kw = _pair(kernel_size, "kernel_size")
        r_out, r_in = _pair(max_rank, "max_rank")
        check_tucker_ranks(
            "TuckerConv2d", out_channels, in_channels, kh * kw, r_out, r_in
        )
        a, b = _pair(max_rank if rank is None else rank, "rank")
        if a > r_out or b > r_in:
            raise ValueError(
                f"TuckerConv2d: rank {(a, b)} exceeds max_rank {(r_out, r_in)}."
            )
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("SAME", "VALID"):
                raise ValueError(
                    "TuckerConv2d: padding string must be 'SAME' or 'VALID'; got "
                    f"{padding!r}."
                )
            self.padding = padding
        elif isinstance(padding, int):
            self.padding = ((padding, padding), (padding, padding))
        else:  # (ph, pw) or ((top, bottom), (left, right)) as eqx.nn.Conv2d stores it
            self.padding = tuple(
                (p, p) if isinstance(p, int) else tuple(p) for p in padding
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        kk, kb = jr.split(key)
        lim = 1 / np.sqrt(in_channels * kh * kw)
        kernel = jr.uniform(kk, (out_channels, in_channels, kh, kw), dtype, -lim, lim)
        uo, core, ui = tucker2(np.asarray(kernel, np.float64), r_out, r_in)
        self.u_out = jnp.asarray(uo, dtype)
        self.core = jnp.asarray(core, dtype)
        self.u_in = jnp.asarray(ui, dtype)
        self.bias = (
            jr.uniform(kb, (out_channels,), dtype, -lim, lim) if use_bias else None
        )
        self.mask_out = (jnp.arange(r_out) < a).astype(dtype)
        self.mask_in = (jnp.arange(r_in) < b).astype(dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)

    @property
    def max_rank(self) -> tuple[int, int]:
        return self.core.shape[0], self.core.shape[1]

    @property
    def rank(self) -> Int[Array, " 2"]:
        return jnp.stack(
            [jnp.sum(self.mask_out > 0), jnp.sum(self.mask_in > 0)]
        ).astype(jnp.int32)

    @property
    def masked_core(self) -> Float[Array, "r_out r_in kh kw"]:
        mo = jax.lax.stop_gradient(self.mask_out)
        mi = jax.lax.stop_gradient(self.mask_in)
        return self.core * (mo[:, None, None, None] * mi[None, :, None, None])

    @property
    def weight(self) -> Float[Array, "out in kh kw"]:
        return jnp.einsum(
            "oa,ib,abhw->oihw", self.u_out, self.u_in, self.masked_core, precision=HI
        )

    def __call__(
        self, x: Float[Array, "in h w"], *, key=None
    ) -> Float[Array, "out hh ww"]:
        if x.ndim != 3 or x.shape[0] != self.in_channels:
            raise ValueError(
                f"TuckerConv2d: expected input of shape ({self.in_channels}, H, W); "
                f"got {x.shape}."
            )
        h = jnp.einsum("ib,ixy->bxy", self.u_in, x, precision=HI)
        h = jax.lax.conv_general_dilated(
            h[None],
            self.masked_core,
            window_strides=self.stride,
            padding=self.padding,
            rhs_dilation=self.dilation,
            precision=HI,
        )[0]
        y = jnp.einsum("oa,axy->oxy", self.u_out, h, precision=HI)
        return y if self.bias is None else y + self.bias[:, None, None]

    def with_rank(self, rank) -> TuckerConv2d:
        """The same factors with the leading `rank = (out, in)` columns active
        (traceable; an int sets both)."""
        r = jnp.broadcast_to(jnp.asarray(rank), (2,))
        mo = (jnp.arange(self.max_rank[0]) < r[0]).astype(self.mask_out.dtype)
        mi = (jnp.arange(self.max_rank[1]) < r[1]).astype(self.mask_in.dtype)
        return eqx.tree_at(lambda m: (m.mask_out, m.mask_in), self, (mo, mi))

    def to_dense(self) -> eqx.nn.Conv2d:
        """An `eqx.nn.Conv2d` with the dense kernel (active part) and the same bias."""
        dense = eqx.nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            use_bias=self.bias is not None,
            dtype=self.core.dtype,
            key=jr.key(0),
        )
        dense = eqx.tree_at(lambda m: m.weight, dense, self.weight)
        if self.bias is not None:
            dense = eqx.tree_at(lambda m: m.bias, dense, self.bias[:, None, None])
        return dense

    def shrink(self) -> TuckerConv2d:
        """Export at the active ranks (max_rank = rank). Host-side; not under `jit`."""
        ko = np.nonzero(np.asarray(self.mask_out) > 0)[0]
        ki = np.nonzero(np.asarray(self.mask_in) > 0)[0]
        if ko.size == 0 or ki.size == 0:
            raise ValueError("TuckerConv2d.shrink: the layer has rank 0.")
        return eqx.tree_at(
            lambda m: (m.u_out, m.core, m.u_in, m.mask_out, m.mask_in),
            self,
            (
                self.u_out[:, ko],
                self.core[np.ix_(ko, ki)],
                self.u_in[:, ki],
                jnp.ones(ko.size, self.mask_out.dtype),
                jnp.ones(ki.size, self.mask_in.dtype),
            ),
        )

    # The generic Tucker-2 view used by `dlrt`: (u_out, core (a, b, k), u_in, masks).
    def _tucker(self):
        a, b = self.max_rank
        return (
            self.u_out,
            self.core.reshape(a, b, -1),
            self.u_in,
            self.mask_out,
            self.mask_in,
        )

    def _with_tucker(self, uo, core, ui, mo, mi) -> TuckerConv2d:
        core = core.reshape(self.core.shape)
        return eqx.tree_at(
            lambda m: (m.u_out, m.core, m.u_in, m.mask_out, m.mask_in),
            self,
            (uo, core, ui, mo, mi),
        )
