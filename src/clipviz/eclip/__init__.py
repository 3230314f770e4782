"""ECLIP (Li et al., "Exploring Visual Interpretability for CLIP"): the explain head and free
attention (`head`), options (`config`), data order and learning rate (`schedule`), objective
(`objective`, `losses`), checkpoints and distributed plumbing (`state`), the loop (`train`)."""
