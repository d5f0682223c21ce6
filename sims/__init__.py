"""The simulated world: anatomy, scanners, hospitals, datasets, model, training."""
