"""`eqlin.detach` finds eqlin's hand-written split in eqlin's plain forward on every family (the same J to
<= 1e-14 relative, final and layer maps, the same frozen sites per layer), one rule per primitive class,
sub-programs (jit, scan, cond, while, checkpoint, custom_jvp/vjp), refusals naming the primitive and the
line, and a Flax NNX decoder taken apart end to end."""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqlin.decoder import embed
from eqlin.detach import DetachError, FrozenSites, detach
from eqlin.errors import InputError
from eqlin.linear_maps import cumulative_fn
from tests.conftest import AFFINE_VARIANTS, CORE_VARIANTS, MORE_VARIANTS, TEXT, relative

EXACT = 1e-14


def _layout(sites: FrozenSites) -> collections.Counter:
    """Sites as (sub-program, size) counts: where and how much was frozen, whatever rule found it (a size,
    not a shape: jax.nn.dot_product_attention's probabilities carry a batch axis)."""
    return collections.Counter((s.path, int(np.prod(s.shape))) for s in sites)


@pytest.mark.parametrize("variant", CORE_VARIANTS + MORE_VARIANTS + AFFINE_VARIANTS)
def test_detach_of_the_plain_forward_is_the_hand_written_split(variant, loaded):
    """The maps of layer 0 and of the last layer (whose residual through the final norm is the final hidden
    state), residual and attention branch, of detach(plain forward) equal the hand-detached ones to <= 1e-14
    relative, with the same frozen sites in every sub-program (the scanned layer body, the last layer, the
    final norm), and reconstruct the output with detach's own constant."""
    model = loaded(variant)
    x = embed(model.params, model.config, model.encode(TEXT))
    layers, parts = (0, model.config.num_layers - 1), ("residual", "attn")
    plain = cumulative_fn(model.params, model.config, layers, parts, False)  # x (T, d) -> (2, 2, d)
    hand = cumulative_fn(model.params, model.config, layers, parts, True)
    found = detach(plain)
    J = jax.jit(jax.jacrev(found))(x)  # (2, 2, d, T, d)
    assert relative(J, jax.jit(jax.jacrev(hand))(x)) <= EXACT
    sites = found.sites(x)
    assert _layout(sites) == _layout(detach(hand).sites(x))
    # One layer of the scanned stack (its body is checkpointed: path "scan/remat2"): every norm's scale, the
    # probabilities and the gate.
    body = [s for s in sites if s.path.split("/")[0] == "scan"]
    norms = sum(getattr(model.params.layers, n) is not None
                for n in ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm"))
    assert sum(s.primitive == "rsqrt" for s in body) == norms and len(body) == norms + 2
    assert {s.rule for s in sites} == {"coefficient"}
    c = jax.jit(found.constant)(x)
    assert relative(jnp.einsum("...otd,td->...o", J, x) + c, jax.jit(plain)(x)) <= EXACT
    assert bool(jnp.any(c != 0)) == model.config.has_biases  # exactly 0 without biases


# --- one rule per primitive class ------------------------------------------------------------------------

KEYS = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(KEYS[0], (3, 4), dtype=jnp.float64)
W = jax.random.normal(KEYS[1], (4, 4), dtype=jnp.float64)


def _exact(f, x=X, jac=jax.jacrev):
    """detach(f): its values are f's, and f(x) = J x + c to float64 rounding; returns (J, sites)."""
    g = detach(f)
    y = f(x)
    J = jac(g)(x)
    chex.assert_trees_all_close(g(x), y, rtol=0, atol=0)
    recon = jnp.tensordot(J, x, axes=x.ndim) + g.constant(x)
    assert relative(recon, y) <= EXACT
    return J, g.sites(x)


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("f, hand, rules", [
    # linear operations: nothing frozen, J is the plain Jacobian
    (lambda x: jnp.concatenate([x @ W, -x[::-1]], axis=1).sum(0) * 2.0, None, []),
    # affine: a constant added, c = the bias carried through
    (lambda x: (x + 1.5) @ W, None, []),
    # RMSNorm: the scale, whatever power it squares with (square, integer_pow, x*x)
    (_rms, lambda x: x * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6)),
     ["coefficient"]),
    # LayerNorm: the centring is linear, only the scale is frozen
    (lambda x: (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5),
     lambda x: (x - x.mean(-1, keepdims=True)) / jax.lax.stop_gradient(jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)),
     ["denominator"]),
    # a gated unit: the whole activated gate, not σ inside silu, in either operand order
    (lambda x: (x @ W) * jax.nn.silu(x @ W.T), lambda x: (x @ W) * jax.lax.stop_gradient(jax.nn.silu(x @ W.T)),
     ["coefficient"]),
    # GELU alone (GPT-2's MLP): z·Φ(z) with Φ frozen
    (lambda x: jax.nn.gelu(x @ W, approximate=False) @ W,
     lambda x: ((x @ W) * jax.lax.stop_gradient(0.5 * (1 + jax.lax.erf((x @ W) / np.sqrt(2))))) @ W, ["activation"]),
    # attention: q·kᵀ left alone, the probabilities (after the max-subtracting softmax) frozen
    (lambda x: jax.nn.softmax((x @ W) @ x.T, axis=-1) @ x,
     lambda x: jax.lax.stop_gradient(jax.nn.softmax((x @ W) @ x.T, axis=-1)) @ x, ["coefficient"]),
    # relu (custom_jvp around max), abs: their selection or sign, read at x for the constant
    (lambda x: jax.nn.relu(x - 0.3) @ W, lambda x: jnp.where(jax.lax.stop_gradient(x > 0.3), x - 0.3, 0.0) @ W,
     ["selection"]),
    (lambda x: jnp.abs(x) * 2.0, lambda x: x * jax.lax.stop_gradient(jnp.sign(x)) * 2.0, ["sign"]),
    # a power on the linear path: x·x^(n−1)
    (lambda x: x ** 3, lambda x: x * jax.lax.stop_gradient(x ** 2), ["power"]),
    # an existing stop_gradient is kept and read at x for the constant
    (lambda x: x * jax.lax.stop_gradient(jnp.tanh(x)) + 1.0, None, ["already frozen"]),
    # an index and a value chosen by x: read at x for the constant (at zero input both would differ)
    (lambda x: x[jnp.argmax(x[:, 0])] @ W + jnp.where(x.sum() != 0, 1.0, -1.0), None,
     ["discrete", "already frozen"]),
])
def test_each_rule_is_exact_and_is_the_hand_written_split(f, hand, rules):
    J, sites = _exact(f)
    assert [s.rule for s in sites] == rules
    if hand is not None:
        assert relative(J, jax.jacrev(hand)(X)) <= EXACT
    if hand is None:  # nothing nonlinear on the linear path: J is the plain Jacobian
        assert relative(J, jax.jacrev(f)(X)) <= EXACT


@pytest.mark.parametrize("custom_jvp", [False, True])
def test_softmax_with_or_without_its_custom_jvp_is_frozen_whole(custom_jvp):
    with jax.softmax_custom_jvp(custom_jvp):
        J, sites = _exact(lambda x: jax.nn.softmax((x @ W) @ x.T, axis=-1) @ x)
        hand = jax.jacrev(lambda x: jax.lax.stop_gradient(jax.nn.softmax((x @ W) @ x.T, axis=-1)) @ x)(X)
    assert relative(J, hand) <= EXACT
    assert [(s.rule, s.shape) for s in sites] == [("coefficient", (3, 3))]


def test_a_tie_freezes_the_first_operand_unless_prefer_names_the_site():
    """x ⊙ (x W): both operands linear; the first is frozen by default, the other where `prefer` says so."""
    def f(x):
        return x * (x @ W)

    sites = detach(f).sites(X)
    assert [s.rule for s in sites] == ["tie"]
    line = sites[0].where.split(" (")[0].rsplit("/", 1)[-1]  # "test_detach.py:NN"
    first = jax.jacrev(detach(f))(X)
    second = jax.jacrev(detach(f, prefer={line: 1}))(X)
    assert relative(first, jax.jacrev(lambda x: jax.lax.stop_gradient(x) * (x @ W))(X)) <= EXACT
    assert relative(second, jax.jacrev(lambda x: x * jax.lax.stop_gradient(x @ W))(X)) <= EXACT
    assert [s.rule for s in detach(f, prefer={line: 1}).sites(X)] == ["prefer"]


def test_sub_programs_are_followed():
    """Nested jit, scan over stacked layers (the carry's class a fixed point), cond, while with a trip count
    that does not depend on x, checkpoint and custom_jvp (untouched: no freeze inside): the same J as the
    hand-detached program, sites inside them."""
    Ws = jax.random.normal(KEYS[2], (3, 4, 4), dtype=jnp.float64) / 2

    @jax.custom_jvp
    def scaled(x):
        return 2.0 * x
    scaled.defjvp(lambda primals, tangents: (scaled(*primals), 2.0 * tangents[0]))

    def layers(x, freeze):
        norm = (lambda h: h * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6))
                ) if freeze else _rms

        @jax.checkpoint
        def block(h, w):
            gate = jax.nn.silu(norm(h) @ w)
            return h + scaled((jax.lax.stop_gradient(gate) if freeze else gate) * (norm(h) @ w.T)), None

        h, _ = jax.lax.scan(block, x, Ws)
        h = jax.lax.cond(h.sum() > 0, lambda v: jax.jit(jax.jit(norm))(v), lambda v: -norm(v), h)
        return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, norm(c[1]) @ W), (0, h))[1]

    J, sites = _exact(lambda x: layers(x, False), jac=jax.jacfwd)  # forward mode: the while loop
    assert relative(J, jax.jacfwd(lambda x: layers(x, True))(X)) <= EXACT
    assert collections.Counter(s.path.split("/")[0] for s in sites) == {"scan": 2, "": 1, "cond[0]": 1, "cond[1]": 1,
                                                                       "while": 1}


@pytest.mark.parametrize("custom", ["jvp", "vjp"])
def test_a_custom_derivative_is_inlined_where_a_freeze_falls_inside(custom):
    """A norm behind custom_jvp or custom_vjp (whose rules know nothing of freezing) is run as its body, frozen
    inside; the custom rule is what the plain Jacobian would use."""
    if custom == "jvp":
        norm = jax.custom_jvp(_rms)
        norm.defjvp(lambda primals, tangents: (_rms(*primals), 0.5 * tangents[0]))
    else:
        norm = jax.custom_vjp(_rms)
        norm.defvjp(lambda x: (_rms(x), None), lambda _, g: (0.5 * g,))
    J, sites = _exact(lambda x: norm(x) @ W)
    hand = jax.jacrev(lambda x: x * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6))
                      @ W)(X)
    assert relative(J, hand) <= EXACT
    assert [(s.path.split("[")[0], s.primitive) for s in sites] == [(f"custom_{custom}_call", "rsqrt")]


@pytest.mark.parametrize("transform", ["jit", "vmap", "jacfwd", "linearize"])
def test_the_detached_function_works_under_jax_transformations(transform):
    def f(x):
        return jax.nn.softmax(x @ x.T) @ _rms(x) @ W + 0.1

    g = detach(f)
    J = jax.jacrev(g)(X)
    if transform == "jit":
        chex.assert_trees_all_close(jax.jit(g)(X), f(X), rtol=1e-15)
        chex.assert_trees_all_close(jax.jit(jax.jacrev(g))(X), J, rtol=1e-14, atol=1e-15)
    elif transform == "vmap":
        chex.assert_trees_all_close(jax.vmap(jax.jacrev(g))(jnp.stack([X, X])), jnp.stack([J, J]), rtol=1e-14,
                                    atol=1e-15)
    elif transform == "jacfwd":
        chex.assert_trees_all_close(jax.jacfwd(g)(X), J, rtol=1e-14, atol=1e-15)
    else:
        y, jvp = jax.linearize(g, X)
        chex.assert_trees_all_close(jvp(X) + g.constant(X), y, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("f, primitive, why", [
    (lambda x: jnp.tanh(_rms(x) @ W / 30.0) * 30.0, "tanh", "stays nonlinear"),  # a final softcap
    (lambda x: jnp.exp(x @ W), "exp", "stays nonlinear"),
    (lambda x: jax.nn.log_softmax(x @ W), "log", "stays nonlinear"),
    (lambda x: 1.0 / x, "div", "1/x"),
    (lambda x: x ** -2, "integer_pow", "1/x"),
    (lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x), "pure_callback", "no rule"),
    (lambda x: jax.lax.while_loop(lambda v: v.sum() < 100.0, lambda v: v * 2.0, x), "while", "trip count"),
])
def test_what_cannot_be_split_is_refused_naming_the_primitive_and_line(f, primitive, why):
    with pytest.raises(DetachError, match=rf"cannot split `{primitive}\S*` at \S*test_detach.py:\d+ .*{why}"):
        detach(f)(X)


def test_the_sites_print_as_a_table_and_html():
    sites = detach(lambda x: jax.nn.silu(x @ W) * (x @ W.T)).sites(X)
    assert len(sites) == 1 and sites.output == "linear"
    assert sites[0].primitive == "jit[silu]" and sites[0].shape == (3, 4) and sites[0].consumer == "mul"
    text = repr(sites)
    assert "1 frozen sites; the map is linear" in text and "jit[silu]" in text and "test_detach.py:" in text
    assert "<td>jit[silu]</td>" in sites._repr_html_()


@pytest.mark.parametrize("kwargs, message", [
    (dict(argnums=(0, 1)), "one argument to linearize in"),
    (dict(argnums=3), "argnums=3, but the function was called with 1"),
    (dict(prefer={"model.py:3": 2}), "the operand to freeze there, 0 or 1"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        detach(lambda x: x * 2.0, **kwargs)(X)


# --- a Flax NNX decoder, written the way people write them ------------------------------------------------

D, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 16, 4, 2, 4, 24, 40, 3
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def rope(x, positions):
    """Rotary embedding, half-split layout, float64 angles. x (T, heads, hd)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * (10000.0 ** (-jnp.arange(half) / half))[None, :]  # (T, hd/2)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _norm(module, x, hand):
    """nnx.RMSNorm, or by hand with its scale frozen (the hand-detached module)."""
    if not hand:
        return module(x)
    return x * jax.lax.stop_gradient(jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + module.epsilon)) * \
        module.scale[...]


def decoder_class(nnx):
    """The decoder module, defined once flax is known to be importable."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            dense = dict(use_bias=False, precision=jax.lax.Precision.HIGHEST, rngs=rngs, **F64)
            self.attn_norm, self.mlp_norm = nnx.RMSNorm(D, rngs=rngs, **F64), nnx.RMSNorm(D, rngs=rngs, **F64)
            self.q, self.k = nnx.Linear(D, HEADS * HEAD_DIM, **dense), nnx.Linear(D, KV_HEADS * HEAD_DIM, **dense)
            self.v, self.o = nnx.Linear(D, KV_HEADS * HEAD_DIM, **dense), nnx.Linear(HEADS * HEAD_DIM, D, **dense)
            self.gate, self.up = nnx.Linear(D, FFN, **dense), nnx.Linear(D, FFN, **dense)
            self.down = nnx.Linear(FFN, D, **dense)

        def __call__(self, x, hand=False):
            T = x.shape[0]
            h = _norm(self.attn_norm, x, hand)
            positions = jnp.arange(T, dtype=jnp.float64)
            q = rope(self.q(h).reshape(T, HEADS, HEAD_DIM), positions)
            k = rope(self.k(h).reshape(T, KV_HEADS, HEAD_DIM), positions)
            v = self.v(h).reshape(T, KV_HEADS, HEAD_DIM)
            if not hand:
                out = jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True, implementation="xla")[0]
            else:  # the XLA implementation's arithmetic (float32 softmax), probabilities frozen
                g = HEADS // KV_HEADS
                logits = jnp.einsum("tkgh,skh->kgts", q.reshape(T, KV_HEADS, g, HEAD_DIM), k) / np.sqrt(HEAD_DIM)
                logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -0.7 * jnp.finfo(jnp.float64).max)
                probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), -1).astype(jnp.float64))
                out = jnp.einsum("kgts,skh->tkgh", probs, v)
            x = x + self.o(out.reshape(T, HEADS * HEAD_DIM))
            h = _norm(self.mlp_norm, x, hand)
            gate = jax.nn.silu(self.gate(h))
            return x + self.down((jax.lax.stop_gradient(gate) if hand else gate) * self.up(h))

    class Decoder(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, D, rngs=rngs, **F64)

            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def blocks(rngs):
                return Block(rngs)

            self.blocks = blocks(rngs)
            self.norm = nnx.RMSNorm(D, rngs=rngs, **F64)

        def hidden(self, x, hand=False):
            """Input embeddings x (T, d) -> the final-normed hidden state at the last position (d,)."""
            graph, state = nnx.split(self.blocks)

            def step(h, layer):
                return nnx.merge(graph, layer)(h, hand), None

            h, _ = jax.lax.scan(step, x, state)
            return _norm(self.norm, h[-1], hand)

    return Decoder


@pytest.fixture(scope="module")
def decoder():
    nnx = pytest.importorskip("flax.nnx", reason='the flax extra: pip install "eqlin[flax]"')
    model = decoder_class(nnx)(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(params))))
    nnx.update(model, jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape, p.dtype),
                                             params))  # norm scales away from 1
    return model


def test_a_flax_nnx_decoder_is_taken_apart(decoder):
    """Reconstruction to float64 rounding, J equal to the hand-detached module's, the frozen sites the
    hand-written ones, the top singular vectors decoded through the model's own unembedding."""
    from eqlin.linear_maps import Linearization, finish
    from eqlin.spectral import spectrum

    ids = jnp.array([3, 17, 5, 29, 11, 8, 2])
    x = decoder.embed(ids)
    g = detach(decoder.hidden)
    J = jax.jit(jax.jacrev(g))(x)  # (d, T, d)
    y = decoder.hidden(x)
    contributions, error = finish(y, J, x, g.constant(x))
    assert error <= EXACT
    assert relative(J, jax.jacrev(lambda v: decoder.hidden(v, hand=True))(x)) <= EXACT
    assert _layout(g.sites(x)) == _layout(detach(lambda v: decoder.hidden(v, hand=True)).sites(x))
    assert sorted(s.rule for s in g.sites(x) if s.path) == ["coefficient"] * 4  # 2 norms, probabilities, gate

    spec = spectrum(Linearization(J, x, y, contributions, error, ids), k=3, per_token=False)
    logits = decoder.embed.attend(spec.U.T)  # (k, V): each left singular vector through the unembedding
    top = jax.lax.top_k(logits, 5)[1]
    chex.assert_shape(top, (3, 5))
    assert relative(spec.U.T @ spec.U, jnp.eye(3)) <= 1e-12
    # J x + c is y, so it decodes to the model's own next token
    assert jnp.argmax(decoder.embed.attend(contributions.sum(0) + g.constant(x))) == jnp.argmax(
        decoder.embed.attend(y))


def test_the_nnx_decoder_under_jit_and_vmap(decoder):
    g = detach(decoder.hidden)
    xs = decoder.embed(jnp.array([[3, 17, 5, 29], [1, 2, 30, 7]]))
    chex.assert_trees_all_close(jax.jit(jax.vmap(g))(xs), jax.vmap(decoder.hidden)(xs), rtol=1e-15)
    Js = jax.jit(jax.vmap(jax.jacrev(g)))(xs)
    for J, x in zip(Js, xs):
        assert relative(J, jax.jacrev(lambda v: decoder.hidden(v, hand=True))(x)) <= EXACT
        assert relative(jnp.einsum("otd,td->o", J, x), decoder.hidden(x)) <= EXACT
