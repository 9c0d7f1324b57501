"""Training the distiller: the two stages, their examples, losses, teacher cache, checkpoints and
validation curves; and refining a set's vectors."""
