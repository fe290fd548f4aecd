"""Autograd wiring (layer 5): the fused attention as ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` traces it without graph breaks."""
