"""Image augmentation inside jitted steps: random crop from a zero-padded image, horizontal flip and
cutout, as the DARTS code's CIFAR transforms (search: crop and flip; training: also cutout). Sizes
are given for 32x32 images and scale with the image's height. The images are normalised already,
so the crop's zero padding is the data's mean colour (torchvision pads the raw pixels with black).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray


def augment_images(
    key: PRNGKeyArray,
    x: Float[Array, "n h w c"],
    *,
    crop_padding: int = 4,
    flip: bool = True,
    cutout_length: int = 0,
) -> Float[Array, "n h w c"]:
    """Each image of `x` cropped back to its size from a zero-padded copy (`crop_padding` pixels
    at 32x32), mirrored left-right with probability 1/2 (`flip`) and with a square of side
    `cutout_length` (at 32x32; 0: none) set to zero, each draw its own."""
    n, h, w, _ = x.shape
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    pad = round(crop_padding * h / 32)
    if pad:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda img, o: lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(padded, offsets)
    if flip:
        mirrored = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        x = jnp.where(mirrored, x[:, :, ::-1, :], x)
    length = round(cutout_length * h / 32)
    if length:
        k_row, k_col = jax.random.split(k_cut)
        cy, cx = jax.random.randint(k_row, (n, 1), 0, h), jax.random.randint(k_col, (n, 1), 0, w)
        rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
        # as the original: the square [c - L//2, c + L//2) clipped to the image
        in_rows = (rows >= cy - length // 2) & (rows < cy + length // 2)
        in_cols = (cols >= cx - length // 2) & (cols < cx + length // 2)
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        x = jnp.where(mask[..., None], jnp.zeros((), x.dtype), x)
    return x


def search_augmentation(config):
    """The search's `augment(key, images)`: crop and flip where `config.augment`, else None."""
    return functools.partial(augment_images, crop_padding=4, flip=True) if config.augment else None
