"""The PyTorch trainers (SD 1.x/2.x and SDXL): models, loss, step and loop, session, validation; on top of the
framework-neutral core in controlnet_training/."""
