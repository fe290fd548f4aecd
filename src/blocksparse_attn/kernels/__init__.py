"""Triton kernels (layer 4) and their launchers: plain functions on tensors, no autograd.

Nothing here imports Triton at package import time: :mod:`.availability` tells whether the
kernels can run, and the kernel modules import Triton when they are loaded.
"""
