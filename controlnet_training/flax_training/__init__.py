"""The JAX/Flax trainer's own pieces (train_controlnet_flax.py), one module per concern: flags, device mesh and
processes, host data sharding, the jitted train step, orbax checkpoints, validation/export, trackers, the loop.

Everything framework-neutral (data rows, checkpoint folders, step arithmetic, model card) is reused from the
package; the models are in controlnet_training.flax_models.
"""
