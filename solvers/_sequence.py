"""Sequences of related SPD systems solved by CG under `lax.scan`, recycling a
deflation subspace from system to system."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdecomp._misc import mm

from ._cg import as_matvec, as_preconditioner, check_options, solve
from ._solution import RESULTS


class SequenceSolution(eqx.Module):
    """The result of [`solvers.solve_sequence`][], indexed like the input (whatever
    the order of solution).

    - `x`: solutions, shape `(N, n)`.
    - `n_steps`: CG iterations per system, shape `(N,)`.
    - `residual_norm`: final residual norm per system (the true residual
        $\\|b - Ax\\|_2$ where it was checked: see [`solvers.cg`][]).
    - `converged`: per system.
    - `result`: a [`solvers.RESULTS`][] code per system.
    - `order`: the order in which the systems were solved (a permutation of
        `0..N-1`).
    - `ritz_vectors`: the recycled basis after the last system, `(n, k)` (pass it
        as `deflation=` to continue the sequence), or `None` without recycling.
    """

    x: Float[Array, "N n"]
    n_steps: Int[Array, " N"]
    residual_norm: Float[Array, " N"]
    converged: Bool[Array, " N"]
    result: RESULTS
    order: Int[Array, " N"]
    ritz_vectors: Float[Array, "n k"] | None = None

    @property
    def total_steps(self) -> Int[Array, ""]:
        """CG iterations summed over the sequence."""
        return jnp.sum(self.n_steps)


def greedy_order(features: Float[Array, "N f"]) -> Int[Array, " N"]:
    """SKR's greedy nearest-neighbour order: start at system 0, then always go to the
    nearest (Euclidean, in `features`) system not yet solved. O(N^2 f)."""
    features = jnp.asarray(features)
    n = features.shape[0]
    sq = jnp.sum(features**2, axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * mm(features, features.T)

    def step(carry, _):
        current, visited = carry
        d = jnp.where(visited, jnp.inf, dist[current])
        nxt = jnp.argmin(d)
        return (nxt, visited.at[nxt].set(True)), nxt

    visited0 = jnp.zeros(n, bool).at[0].set(True)
    _, rest = lax.scan(step, (jnp.array(0), visited0), None, length=n - 1)
    return jnp.concatenate([jnp.zeros(1, rest.dtype), rest]).astype(jnp.int32)


def _batched_length(fn, tree, what) -> int:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if eqx.is_array(x)]
    if not leaves:
        raise ValueError(f"{fn}: {what} has no array leaves to index by system.")
    lengths = {x.shape[0] if x.ndim else None for x in leaves}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"{fn}: every array leaf of the batched {what} needs the same leading "
            f"(system) axis; got leading sizes {sorted(map(str, lengths))}."
        )
    return lengths.pop()


def solve_sequence(
    operators: Any,
    rhs: Float[ArrayLike, "N n"] | Callable[[Array, Array], Array],
    *,
    length: int | None = None,
    recycle: int = 0,
    window: int | None = None,
    preconditioner: Callable[[Any], Any] | None = None,
    order: None | str | Int[ArrayLike, " N"] = None,
    features: Float[ArrayLike, "N f"] | None = None,
    deflation: Float[ArrayLike, "n k"] | None = None,
    warm_start: bool = True,
    initial: Float[ArrayLike, " n"] | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    max_steps: int | None = None,
    flexible: bool = False,
    memory: int = 5,
    throw: bool = True,
) -> SequenceSolution:
    """Solve a sequence of related SPD systems $A_i x_i = b_i$ by (flexible)
    preconditioned CG under `lax.scan`, recycling a $k$-dimensional subspace from
    system to system (Krylov subspace recycling for sequences; deflated CG of Saad,
    Yeung, Erhel & Guyomarc'h 2000 with the recycled space refreshed by harmonic
    Ritz vectors as in recycled CG, Parks et al. 2006 / Wang, de Sturler & Paulino
    2007; system ordering of SKR, Wang et al. 2024).

    System $i$ is solved by [`solvers.cg`][] with `deflation` = the previous
    system's `ritz_vectors`: the $k$ harmonic Ritz vectors of the previous
    preconditioned operator with the smallest values, taken from the previous basis
    and the first `window` search directions of the previous solve. The slow modes
    of related operators are close, so each solve starts with them removed; the
    basis improves along the sequence (each solve adds `window` fresh directions).
    Overhead per system: $k$ matvecs, $k$ preconditioner applications ($k +$
    `window` with `flexible=True`), $O(n(k + \\text{window})^2)$ work, and four
    products with $k \\times n$ matrices per iteration (2.5 in float64).

    **Arguments:**

    - `operators`: a batched pytree of operators (every array leaf has the system
        index as leading axis: e.g. [`solvers.problems.heat_steps`][], a
        `jax.vmap` of a problem constructor, or an `(N, n, n)` array), or a
        function `i -> operator` (then `length` is needed if `rhs` is a callable).
        Each operator is anything [`solvers.cg`][] takes.
    - `rhs`: the right-hand sides `(N, n)`, or a function `(i, x_prev) -> b_i` of the
        index and the previous system's solution (`initial` for the first): time
        stepping, e.g. `lambda i, u: ops.shift[i] * u` for the implicit-Euler
        steps of [`solvers.problems.heat_steps`][] (their $h^2$-scaled form
        $(A + sI)u_{k+1} = s u_k$).
    - `length`: the number of systems (needed only when both are callables).
    - `recycle`: $k$, the recycled dimension (static; 0: plain warm-started PCG).
    - `window`: directions recorded per solve for the Ritz extraction (static;
        default `max(2 recycle, 10)`).
    - `preconditioner`: `None` or a function `operator -> preconditioner` called on
        each system inside the scan (e.g. `solvers.Jacobi`,
        `lambda op: solvers.IncompleteCholesky(op.to_sparse())`, or `lambda op: M`
        for a fixed one).
    - `order`: `None` (the given order), `"greedy"` (SKR's nearest-neighbour order
        on `features`, default: the flattened array leaves of the batched
        operators) or a permutation. Only with an array `rhs` (a callable `rhs`
        chains the systems in their given order).
    - `features`: `(N, f)` descriptors of the systems for `order="greedy"` (e.g. the
        parameters that generated them).
    - `deflation`: an initial `(n, k)` basis (e.g. the `ritz_vectors` of an earlier
        sequence); default none (the first system is plain PCG).
    - `warm_start`: start each system from the previous solution (default True;
        the first from `initial`, default 0).
    - `rtol`, `atol`, `max_steps`, `flexible`, `memory`: as in [`solvers.cg`][],
        for every system.
    - `throw`: raise if any system fails (the message is that of the first failing
        system in input order; `throw=False` returns a result code per system).

    **Returns:** a [`solvers.SequenceSolution`][].

    **Derivatives:** each solution is differentiated implicitly as in
    [`solvers.cg`][] (forward and reverse mode, any order; the tangent solves are
    deflated by the same basis). The recycled space and the order change how
    each system is solved, not its solution, so they are constants for
    differentiation. With a callable `rhs` the dependence of $b_i$ on $x_{i-1}$
    is differentiated through the scan. Second derivatives: forward over reverse
    (`jax.hessian`) and forward over forward work; reverse over reverse does not
    (JAX cannot transpose the while loop of a linear solve's derivative inside
    `lax.scan`; the same holds for [`solvers.cg`][] under a user's `lax.scan`).

    **Failure modes:** operators or right-hand sides with mismatched shapes or
    dtypes raise at trace time; per system, the result codes of
    [`solvers.cg`][] (e.g. `not_spd` for an operator that stops being SPD
    along the sequence). A failed system's Ritz vectors are dropped (non-finite
    directions are discarded), so the next system starts with whatever of the
    basis remains valid.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import solvers

    base = solvers.problems.diffusion_2d(jax.random.key(0), 32, variance=1.0)
    ops = solvers.problems.heat_steps(base, jnp.full(20, 1e-2))
    u0 = jnp.ones(32 * 32)
    sol = solvers.solve_sequence(
        ops,
        lambda i, u: ops.shift[i] * u,
        initial=u0,
        recycle=8,
        preconditioner=solvers.Jacobi,
    )
    print(sol.n_steps, sol.total_steps)
    ```
    """
    fn = "solve_sequence"
    if callable(rhs) and not eqx.is_array(rhs):
        rhs_fn, rhs_arr = rhs, None
    else:
        rhs_fn, rhs_arr = None, jnp.asarray(rhs)
        if rhs_arr.ndim != 2:
            raise ValueError(
                f"{fn}: rhs must be an (N, n) array of right-hand sides or a function "
                f"(i, x_prev) -> b; got an array of shape {rhs_arr.shape}."
            )
        if not jnp.issubdtype(rhs_arr.dtype, jnp.floating):
            raise TypeError(f"{fn}: rhs must be floating point; got {rhs_arr.dtype}.")
    ops_callable = callable(operators) and not (
        hasattr(operators, "mv") or eqx.is_array(operators)
    )
    sizes = {}
    if rhs_arr is not None:
        sizes["rhs"] = rhs_arr.shape[0]
    if not ops_callable:
        sizes["operators"] = _batched_length(fn, operators, "operators")
    if length is not None:
        sizes["length"] = length
    if not sizes:
        raise ValueError(
            f"{fn}: with callable operators and rhs, pass length=N (the number of "
            "systems)."
        )
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"{fn}: the number of systems differs between "
            + ", ".join(f"{k} ({v})" for k, v in sizes.items())
            + "."
        )
    count = next(iter(sizes.values()))
    if not (isinstance(count, int) and count >= 1):
        raise ValueError(f"{fn}: need at least one system; got {count}.")

    if ops_callable:
        get_op = operators
    else:
        arrays, static = eqx.partition(operators, eqx.is_array)

        def get_op(i):
            return eqx.combine(
                jax.tree_util.tree_map(lambda a: jnp.asarray(a)[i], arrays), static
            )

    # the problem size and dtype, from the first system (trace-time shapes only)
    op0 = jax.eval_shape(get_op, jnp.array(0))
    if rhs_arr is not None:
        n, dtype = rhs_arr.shape[1], rhs_arr.dtype
    else:
        if initial is None:
            raise ValueError(
                f"{fn}: with a callable rhs, pass initial= (x_prev of the first "
                "system, which fixes the size and dtype)."
            )
        init_arr = jnp.asarray(initial)
        n, dtype = init_arr.shape[0], init_arr.dtype
        b0 = jax.eval_shape(rhs_fn, jnp.array(0), init_arr)
        if b0.shape != (n,) or b0.dtype != dtype:
            raise ValueError(
                f"{fn}: rhs(i, x_prev) must return shape ({n},) and dtype {dtype} "
                f"like initial; got {b0.shape} {b0.dtype}."
            )
    x_init = jnp.zeros(n, dtype) if initial is None else jnp.asarray(initial)
    if x_init.shape != (n,) or x_init.dtype != dtype:
        raise ValueError(
            f"{fn}: initial must have shape ({n},) and dtype {dtype}; got "
            f"{x_init.shape} {x_init.dtype}."
        )
    try:
        probe = jax.eval_shape(
            lambda i, x: as_matvec(get_op(i), fn, "each operator")(x),
            jnp.array(0),
            x_init,
        )
    except (TypeError, ValueError) as e:  # e.g. strict dtype promotion
        if str(e).startswith(fn):
            raise
        raise ValueError(
            f"{fn}: each operator must map a vector of shape ({n},) and dtype "
            f"{dtype} (the right-hand sides') to the same; applying it failed: {e}"
        ) from e
    if probe.shape != (n,) or probe.dtype != dtype:
        raise ValueError(
            f"{fn}: each operator must map a vector of shape ({n},) and dtype "
            f"{dtype} (the right-hand sides') to the same; got {probe.shape} "
            f"{probe.dtype}."
        )
    del op0

    opts, window = check_options(
        fn, dtype, n, rtol, atol, max_steps, flexible, memory, recycle, window
    )
    w0 = None
    if deflation is not None:
        w0 = jnp.asarray(deflation)
        if w0.shape != (n, recycle) or w0.dtype != dtype:
            raise ValueError(
                f"{fn}: deflation must have shape ({n}, recycle={recycle}) and dtype "
                f"{dtype}; got {w0.shape} {w0.dtype}."
            )
        w0 = w0.T
    elif recycle:
        w0 = jnp.zeros((recycle, n), dtype)

    if order is None:
        perm = jnp.arange(count, dtype=jnp.int32)
    else:
        if rhs_fn is not None:
            raise ValueError(
                f"{fn}: order is only for an array rhs (a callable rhs chains the "
                "systems in their given order)."
            )
        if isinstance(order, str):
            if order != "greedy":
                raise ValueError(
                    f"{fn}: order must be None, 'greedy' or a permutation; got "
                    f"{order!r}."
                )
            if features is None:
                if ops_callable:
                    raise ValueError(
                        f"{fn}: order='greedy' with callable operators needs "
                        "features= (N, f)."
                    )
                leaves = jax.tree_util.tree_leaves(arrays)
                features = jnp.concatenate(
                    [jnp.reshape(x, (count, -1)).astype(dtype) for x in leaves], 1
                )
            features = jnp.asarray(features)
            if features.ndim != 2 or features.shape[0] != count:
                raise ValueError(
                    f"{fn}: features must have shape ({count}, f); got "
                    f"{features.shape}."
                )
            perm = greedy_order(lax.stop_gradient(features))
        else:
            perm = jnp.asarray(order)
            if perm.shape != (count,) or not jnp.issubdtype(perm.dtype, jnp.integer):
                raise ValueError(
                    f"{fn}: order must be a permutation of 0..{count - 1} (ints, "
                    f"shape ({count},)); got {perm.shape} {perm.dtype}."
                )
            if not isinstance(perm, jax.core.Tracer) and not np.array_equal(
                np.sort(np.asarray(perm)), np.arange(count)
            ):
                raise ValueError(f"{fn}: order is not a permutation of 0..{count - 1}.")
            perm = perm.astype(jnp.int32)

    def body(carry, i):
        x_prev, w = carry
        op = get_op(i)
        matvec = as_matvec(op, fn, "each operator")
        precond = as_preconditioner(
            None if preconditioner is None else preconditioner(op),
            fn,
            "each preconditioner",
        )
        b = rhs_arr[i] if rhs_fn is None else rhs_fn(i, x_prev)
        x0 = x_prev if warm_start else jnp.zeros_like(x_prev)
        x0 = jnp.where(jnp.all(jnp.isfinite(x0)), x0, 0)
        sol = solve(
            matvec,
            precond,
            b,
            x0,
            w,
            opts=opts,
            recycle=recycle,
            window=window,
            differentiation="implicit",
            strict=False,
            throw=throw,
        )
        w_next = None if w is None else sol.ritz_vectors.T
        rnorm = sol.residual_norms[sol.n_steps]
        out = (sol.x, sol.n_steps, rnorm, sol.converged, sol.result)
        return (sol.x, w_next), out

    (_, w_last), outs = lax.scan(body, (x_init, w0), perm)
    # back to input order
    inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(count, dtype=perm.dtype))
    xs, steps, rnorms, conv, result = jax.tree_util.tree_map(lambda a: a[inverse], outs)
    sol = SequenceSolution(
        x=xs,
        n_steps=steps,
        residual_norm=rnorms,
        converged=conv,
        result=result,
        order=perm,
        ritz_vectors=None if w_last is None else w_last.T,
    )
    if throw:
        failed = result != RESULTS.successful
        first = jax.tree_util.tree_map(lambda a: a[jnp.argmax(failed)], result)
        sol = first.error_if(sol, jnp.any(failed))
    return sol
