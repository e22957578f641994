"""Policies: SAC, DSAC-T, PMOE head, HIL (RLPD), replay, trainer, export.

Lands with the off-policy RL core issue; nothing is exported from here yet.
"""
