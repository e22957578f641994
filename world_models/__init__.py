"""Diffusion world models, uncertainty and imagined rollouts for safe finetuning.

Lands with the world-model issue; nothing is exported from here yet.
"""
