"""Spaces are data: a space written outside the package, on the DARTS cell's topology, is searched,
discretised, drawn and trained through the same calls as the built-in ones, which register
themselves the same way."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_arrays

import darts_eqx as dx

PNG = b"\x89PNG\r\n\x1a\n"


class StridedScale(eqx.Module):
    """A user's op: a learned per-channel scale, sampling every `stride`-th pixel."""

    weight: jax.Array
    stride: int = eqx.field(static=True)

    def __call__(self, x, state=None):
        return x[:, :: self.stride, :: self.stride, :] * self.weight[None, None, None, :], state


@pytest.fixture(scope="module")
def cell_space():
    return dx.register_space(
        dx.SearchSpace(
            "scale_cell",
            ("none", "scale", "skip_connect"),
            (
                lambda c, s, norm, key: dx.DARTS_SPACE.make_op("none", c, s, norm, key=key),
                lambda c, s, norm, key: StridedScale(jnp.full((c,), 0.5), s),
                lambda c, s, norm, key: dx.DARTS_SPACE.make_op("skip_connect", c, s, norm, key=key),
            ),
            dx.DARTS_SPACE.topology,
        )
    )


def test_a_space_of_ones_own_on_the_darts_cell_is_searched_discretised_drawn_and_trained(cell_space, tmp_path):
    x, y = tiny_arrays(n=64)
    xt, yt = tiny_arrays(n=32, seed=1)
    data = dx.data.from_arrays(x, y, xt, yt)
    result = dx.search(
        jax.random.key(0), data, space="scale_cell", channels=4, layers=2, epochs=1, batch_size=16, progress=False
    )
    genotype = result.genotype
    assert genotype.space == "scale_cell" and len(genotype.normal) == 8
    assert {op for op, _ in genotype.normal + genotype.reduce} <= {"scale", "skip_connect"}
    assert np.asarray(result.supernet.arch.alpha["normal"].logits).shape == (14, 3)
    # the discretised network holds the user's op modules, with their searched weights
    ops = [op for cell in result.network.cells for op in cell.ops]
    assert any(isinstance(op, StridedScale) for op in ops) or all(g == "skip_connect" for g, _ in genotype.normal)
    x4 = jnp.asarray(data.x_test[:4])
    np.testing.assert_allclose(result.network(x4), dx.discretize(result.supernet)(x4))
    assert dx.plot_cell(genotype, "normal", tmp_path / "n.png", engine="matplotlib") == "matplotlib"
    assert (tmp_path / "n.png").read_bytes().startswith(PNG)
    trained = dx.train(
        jax.random.key(1), genotype, data, channels=4, layers=2, epochs=1, batch_size=16, auxiliary=False
    )
    assert trained.model.space == "scale_cell" and trained.model.genotype == genotype
    assert 0.0 <= trained.history[0]["test_acc"] <= 1.0
    dx.save_trained(tmp_path / "model", trained, 3, 1)
    model, state = dx.load_trained(tmp_path / "model")
    logits, _, _ = model(jnp.asarray(data.x_test), state)
    assert float(np.mean(np.argmax(logits, -1) == data.y_test)) == pytest.approx(trained.history[0]["test_acc"])


def test_built_in_spaces_register_through_the_public_call():
    names = dx.get_space("darts"), dx.get_space("seed"), dx.get_space("nb201")
    assert [s.name for s in names] == ["darts", "seed", "nb201"]
    assert all(isinstance(s.topology, dx.Topology) for s in names)
    with pytest.raises(ValueError, match="topology must be a darts_eqx.Topology"):
        dx.SearchSpace("bad", ("skip_connect",), (dx.SEED_SPACE.constructors[0],), topology="cell")  # type: ignore
