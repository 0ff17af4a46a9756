"""DSpark training: distil drafters against the target (Lightning + Hydra + MLflow)."""
