"""Per-domain losses and gradients equal losses and gradients computed domain by domain."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgjax
from dgjax.models import mlp, mnist_cnn


def make_problem(model, d, b, shape, seed=0):
  key = jax.random.key(seed)
  kx, ky, kp = jax.random.split(key, 3)
  batch = {"x": jax.random.uniform(kx, (d, b) + shape), "y": jax.random.randint(ky, (d, b), 0, 2)}
  params = model.init(kp, batch["x"][0])["params"]

  def loss_fn(p, bt):
    logits = model.apply({"params": p}, bt["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, bt["y"]).mean()

  return loss_fn, params, batch


@pytest.mark.parametrize("impl", ["vmap", "unrolled"])
@pytest.mark.parametrize(
  "model,shape", [(mlp(2, (16, 8)), (6, 6, 2)), (mnist_cnn(2, conv_impl="xla"), (9, 9, 2))]
)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_per_domain_equals_loop(impl, model, shape, d):
  loss_fn, params, batch = make_problem(model, d, 5, shape)
  losses, grads = jax.jit(lambda p, bt: dgjax.per_domain_value_and_grad(loss_fn, p, bt, impl=impl))(
    params, batch
  )
  chex.assert_shape(losses, (d,))
  for i in range(d):
    li, gi = jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda x: x[i], batch))
    np.testing.assert_allclose(losses[i], li, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], grads), gi, rtol=2e-4, atol=1e-6)


def test_mean_of_per_domain_grads_is_pooled_grad():
  loss_fn, params, batch = make_problem(mlp(2, (8,)), 3, 4, (5, 5, 2), seed=1)
  grads = dgjax.per_domain_grads(loss_fn, params, batch)
  pooled = jax.grad(loss_fn)(params, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch))
  chex.assert_trees_all_close(
    jax.tree.map(lambda g: g.mean(0), grads), pooled, rtol=1e-5, atol=1e-7
  )


def test_extra_args_and_aux():
  def loss_fn(p, bt, scale):
    v = scale * jnp.sum(p["w"] * bt)
    return v, {"v": v}

  params = {"w": jnp.arange(3.0)}
  batch = jnp.ones((2, 3)) * jnp.array([[1.0], [2.0]])
  for impl in ("vmap", "unrolled"):
    (losses, aux), grads = dgjax.per_domain_value_and_grad(
      loss_fn, params, batch, 2.0, has_aux=True, impl=impl
    )
    np.testing.assert_allclose(losses, [6.0, 12.0])
    np.testing.assert_allclose(aux["v"], [6.0, 12.0])
    np.testing.assert_allclose(grads["w"], [[2.0] * 3, [4.0] * 3])


def test_errors():
  with pytest.raises(ValueError, match="same leading domain axis"):
    dgjax.num_domains({"x": jnp.ones((2, 3)), "y": jnp.ones((3,))})
  with pytest.raises(ValueError, match="unknown per-domain impl"):
    dgjax.per_domain_grads(lambda p, b: jnp.sum(p * b), jnp.ones(2), jnp.ones((2, 2)), impl="loop")
