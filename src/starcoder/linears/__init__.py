"""What a linear layer can be: dense (dense.py: plain, or packed for oneDNN) or quantized from AutoGPTQ's integer
layout (gptq_layout.py) onto our kernels or PyTorch's (quantized.py, native.py)."""
