"""Autograd wiring (layer 5): the fused attention as ``torch.library`` custom ops with fake
implementations (``fused_attention.py``), and DeepSpeed's ``MatMul`` (``matmul.py``) and
``Softmax`` (``softmax.py``) on the compressed format."""
