"""Losses and codebook statistics of the VQ image tokenizer (task 'vq', `mmjax.models.vq`).

All latents and code vectors here are L2-normalised (the cosine codebook), so squared distances lie in [0, 4].

- `reconstruction_loss`: mean squared ('l2') or absolute ('l1') error per pixel value.
- `clip_to_bounds`: the output clipped to the images' value range; the loss of the clipped output costs nothing
  for a pixel at the range's edge (a digit's blank background) once the output passes the edge, so it renders
  exactly at the edge instead of a little inside.
- `codebook_losses`: the VQ-VAE codebook loss |sg(z) - e|^2 (moves the chosen codes) and commitment loss
  |z - sg(e)|^2 (keeps the encoder near its codes), each summed over the code dimension, averaged over latents.
- `dead_code_loss`: the dead-code restart, done by gradient inside the objective: every code no latent of the batch
  chose is pulled to the batch latent nearest to it that no other dead code took (|e_k - sg(z_t(k))|^2), so an
  unused code walks onto the data, where it starts winning latents; used codes get nothing from it.
- `code_counts`, `usage_and_perplexity`: how many latents chose each code; the fraction of codes used and the
  perplexity exp(H(p)) of the code distribution p (K when all K codes are equally used, 1 for a single code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RECON_LOSSES = ("l2", "l1")


def reconstruction_loss(reconstruction: jax.Array, images: jax.Array, kind: str = "l2") -> jax.Array:
    """reconstruction, images [B, H, W, C] -> scalar: mean over all values of the squared ('l2') or absolute
    ('l1') error."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"model.vq.recon_loss: {kind!r}; choose one of {RECON_LOSSES}")
    err = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
    return jnp.mean(jnp.square(err)) if kind == "l2" else jnp.mean(jnp.abs(err))


def clip_to_bounds(reconstruction: jax.Array, bounds: tuple | None) -> jax.Array:
    """reconstruction [B, H, W, C] clipped to bounds (low, high), each a scalar or one value per channel (no
    gradient beyond them); unchanged when bounds is None."""
    if bounds is None:
        return reconstruction
    return jnp.clip(reconstruction, jnp.asarray(bounds[0]), jnp.asarray(bounds[1]))


def codebook_losses(z: jax.Array, quantized: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z, quantized [..., D] (latents and their codes' vectors) -> (codebook loss, commitment loss), scalars:
    mean over latents of |sg(z) - e|^2 (gradient to the codebook only) and |z - sg(e)|^2 (to the encoder only)."""
    codebook = jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(z) - quantized), axis=-1))
    commitment = jnp.mean(jnp.sum(jnp.square(z - jax.lax.stop_gradient(quantized)), axis=-1))
    return codebook, commitment


def code_counts(codes: jax.Array, codebook_size: int) -> jax.Array:
    """codes int [...] -> float32 [codebook_size]: how many latents chose each code."""
    return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def usage_and_perplexity(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """counts [K] -> (fraction of the K codes used at least once, perplexity exp(-sum p log p) of p = counts /
    sum(counts)), scalars."""
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.mean((counts > 0).astype(jnp.float32)), jnp.exp(entropy)


def distinct_nearest(similarity: jax.Array, dead: jax.Array) -> jax.Array:
    """similarity [K, N] (codes x latents), dead bool [K] -> int32 [K]: for each dead code in index order, the
    most similar latent no earlier dead code took (so dead codes bunched at one point get different latents; with
    more dead codes than latents the last ones get latent 0); for a live code its most similar latent."""

    def take(taken, row_dead):
        row, is_dead = row_dead
        j = jnp.argmax(jnp.where(taken & is_dead, -jnp.inf, row))
        return taken.at[j].set(taken[j] | is_dead), j.astype(jnp.int32)

    _, nearest = jax.lax.scan(take, jnp.zeros(similarity.shape[1], bool), (similarity, dead))
    return nearest


def dead_code_loss(z: jax.Array, codebook: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z [..., D] normalised latents, codebook [K, D] normalised, counts [K] (`code_counts` of this batch) ->
    (loss, number of dead codes): the mean over the K codes of dead(k) * |e_k - sg(z_t(k))|^2, where dead(k) is
    counts[k] == 0 and z_t(k) the latent nearest to e_k among those no other dead code took (`distinct_nearest`).
    Gradient to the codebook only. Targets follow the codes, so they stay put from step to step under Adam's
    momentum, and bunched dead codes spread over distinct latents instead of chasing one."""
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
    dead = counts == 0
    targets = jnp.take(flat, distinct_nearest(jax.lax.stop_gradient(codebook) @ flat.T, dead), axis=0)  # [K, D]
    loss = jnp.mean(dead * jnp.sum(jnp.square(codebook - targets), axis=-1))
    return loss, jnp.sum(dead.astype(jnp.float32))


def vq_loss(outputs: dict[str, jax.Array], images: jax.Array, weights: dict[str, float],
            recon: str = "l2", bounds: tuple | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The tokenizer's objective on a `VQAutoencoder` output (images [B, H, W, C]): reconstruction (of the output
    clipped to `bounds` when given: `clip_to_bounds`) + weights['codebook'] * codebook + weights['commitment'] *
    commitment + weights['restart'] * dead-code loss.

    Metrics (scalars): 'recon_loss', 'mse' (mean squared error, whatever the loss), 'baseline_mse' (of predicting
    every image by the batch's per-pixel mean: the trivial baseline), 'codebook_loss', 'commitment_loss',
    'dead_code_loss', 'dead_codes', 'usage' (fraction of codes used in the batch), 'perplexity'."""
    x = images.astype(jnp.float32)
    shown = clip_to_bounds(outputs["reconstruction"], bounds)  # what the pixels will show
    rec = reconstruction_loss(shown, x, recon)
    codebook, commitment = codebook_losses(outputs["z"], outputs["quantized"])
    counts = code_counts(outputs["codes"], outputs["codebook"].shape[0])
    restart, dead = dead_code_loss(outputs["z"], outputs["codebook"], counts)
    usage, perplexity = usage_and_perplexity(counts)
    loss = (rec + weights["codebook"] * codebook + weights["commitment"] * commitment
            + weights["restart"] * restart)
    metrics = {"recon_loss": rec, "mse": jnp.mean(jnp.square(shown - x)),
               "baseline_mse": jnp.mean(jnp.square(x - jnp.mean(x, axis=0, keepdims=True))),
               "codebook_loss": codebook, "commitment_loss": commitment, "dead_code_loss": restart,
               "dead_codes": dead, "usage": usage, "perplexity": perplexity}
    return loss, metrics
